"""Outbound event webhooks against a real HTTP receiver: events written with the state change
(the ledger over a real MLLP RIS), signed bodies, retries after 500s with the same event id,
failure after the attempt limit, no patient data, the due-time timer."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone
from django_q.models import OrmQ

from pacslens.ops.due_wake import WEBHOOK_TASK, DueWakeThread
from pacslens.ops.schedules import SCHEDULES
from results.deliver.ledger import deliveries_create, deliveries_run_pending
from results.deliver.webhooks import signature, webhook_events_record, webhooks_send_due
from results.models import WebhookEvent, WebhookSubscription
from results.outbox import backoff
from routing.models import Study, StudyState
from tests.support.factories import hl7_destination, inferred_study

pytestmark = pytest.mark.django_db
SECRET = "whsec_test-secret-0123456789"


def subscribe(receiver, **overrides) -> WebhookSubscription:
    values = {"name": "engine", "webhook_url": receiver.url, "secret": SECRET}
    values.update(overrides)
    subscription = WebhookSubscription(**values)
    subscription.full_clean()
    subscription.save()
    return subscription


def make_due():
    WebhookEvent.objects.update(next_attempt_at=timezone.now() - timedelta(seconds=1))


def verify(headers: dict[str, str], raw: bytes, secret: str = SECRET) -> bool:
    """What docs/api.md tells a receiver to do."""
    signed = headers["X-PacsLens-Timestamp"].encode() + b"." + raw
    expected = "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers["X-PacsLens-Signature"])


class TestEventsFromTheLedger:
    def test_a_delivered_study_is_announced_signed_once(self, data_dir, rule, mllp, webhook_receiver):
        subscribe(webhook_receiver)
        study, result = inferred_study(data_dir)
        hl7_destination(rule, mllp.port)
        deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        assert deliveries_run_pending() == 1
        event = WebhookEvent.objects.get()
        assert event.event_type == "study.delivered" and event.state == "pending"
        assert webhooks_send_due() == 1
        [(status, headers, raw)] = webhook_receiver.requests
        assert status == 200 and verify(headers, raw)
        assert not verify(headers, raw, secret="whsec_another-secret-000000")
        assert headers["X-PacsLens-Event-Id"] == str(event.event_id)
        assert headers["X-PacsLens-Event-Type"] == "study.delivered"
        assert headers["Content-Type"] == "application/json"
        body = json.loads(raw)
        assert body["id"] == str(event.event_id) and body["type"] == "study.delivered"
        assert body["data"]["study"] == {"id": study.pk, "study_instance_uid": study.study_instance_uid}
        assert body["data"]["results"] == [
            {
                "uid": str(result.uid),
                "model": "demo",
                "model_version": "1",
                "score": 0.83,
                "flagged": True,
                "label": "",
            }
        ]
        event.refresh_from_db()
        assert event.state == "sent" and event.attempts == 1 and event.sent_at
        assert WebhookSubscription.objects.get().last_sent_at is not None
        assert webhooks_send_due() == 0

    def test_a_failed_delivery_is_announced_and_only_to_its_subscribers(self, data_dir, rule, mllp, webhook_receiver):
        subscribe(webhook_receiver, events="delivery.failed")
        subscribe(webhook_receiver, name="flags-only", events="result.flagged")
        subscribe(webhook_receiver, name="disabled", enabled=False)
        study, result = inferred_study(data_dir)
        hl7_destination(rule, mllp.port, on_ack_error="fail")
        mllp.mode = "AE"
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        deliveries_run_pending()
        assert Study.objects.get(pk=study.pk).state == StudyState.FAILED
        event = WebhookEvent.objects.get()
        assert event.subscription.name == "engine" and event.event_type == "delivery.failed"
        assert event.payload["delivery"] == {
            "id": delivery.pk,
            "destination": "ris",
            "kind": "hl7",
            "attempts": 1,
            "error_class": "permanent",
            "result_uid": str(result.uid),
        }

    def test_a_rolled_back_change_leaves_no_event(self, data_dir, webhook_receiver):
        subscribe(webhook_receiver)
        study, result = inferred_study(data_dir)
        with transaction.atomic():
            webhook_events_record(event_type="result.flagged", study=study, result=result)
            transaction.set_rollback(True)
        assert not WebhookEvent.objects.exists()


class TestSending:
    def record(self, data_dir, receiver, **overrides) -> WebhookEvent:
        subscribe(receiver, **overrides)
        study, result = inferred_study(data_dir)
        [event] = webhook_events_record(event_type="result.flagged", study=study, result=result)
        return event

    def test_500s_are_retried_with_backoff_and_the_same_event_id_and_body(self, data_dir, webhook_receiver):
        event = self.record(data_dir, webhook_receiver)
        webhook_receiver.script = [500, 503]
        assert webhooks_send_due() == 0
        event.refresh_from_db()
        assert event.state == "pending" and event.last_error == "the receiver answered HTTP 500"
        first_retry = event.next_attempt_at - timezone.now()
        assert timedelta(seconds=3) < first_retry <= timedelta(seconds=10)  # base 10 s, jittered
        assert webhooks_send_due() == 0  # not due yet
        make_due()
        assert webhooks_send_due() == 0
        make_due()
        assert webhooks_send_due() == 1
        statuses = [status for status, _, _ in webhook_receiver.requests]
        assert statuses == [500, 503, 200]
        ids = {headers["X-PacsLens-Event-Id"] for _, headers, _ in webhook_receiver.requests}
        assert ids == {str(event.event_id)}
        assert len({raw for _, _, raw in webhook_receiver.requests}) == 1  # the same bytes each time
        assert all(verify(headers, raw) for _, headers, raw in webhook_receiver.requests)
        event.refresh_from_db()
        assert (event.state, event.attempts, event.last_error) == ("sent", 3, "")

    def test_it_fails_for_good_after_the_attempt_limit(self, data_dir, webhook_receiver):
        event = self.record(data_dir, webhook_receiver)
        webhook_receiver.script = [500] * WebhookEvent.MAX_ATTEMPTS
        for _ in range(WebhookEvent.MAX_ATTEMPTS):
            make_due()
            webhooks_send_due()
        event.refresh_from_db()
        assert (event.state, event.attempts) == ("failed", WebhookEvent.MAX_ATTEMPTS)
        make_due()
        assert webhooks_send_due() == 0 and len(webhook_receiver.requests) == WebhookEvent.MAX_ATTEMPTS
        subscription = WebhookSubscription.objects.get()
        assert subscription.last_error == "the receiver answered HTTP 500"

    def test_an_unreachable_receiver_s_url_stays_out_of_the_error(self, data_dir, webhook_receiver):
        event = self.record(data_dir, webhook_receiver)
        webhook_receiver.stop()
        webhooks_send_due()
        event.refresh_from_db()
        assert event.last_error.startswith("cannot reach the receiver (") and "secret-part" not in event.last_error

    def test_a_disabled_subscription_s_events_are_not_sent(self, data_dir, webhook_receiver):
        event = self.record(data_dir, webhook_receiver)
        WebhookSubscription.objects.update(enabled=False)
        webhooks_send_due()
        event.refresh_from_db()
        assert event.state == "failed" and not webhook_receiver.requests

    def test_an_expired_lease_is_taken_over_with_the_same_event_id(self, data_dir, webhook_receiver):
        event = self.record(data_dir, webhook_receiver)
        past = timezone.now() - timedelta(seconds=1)
        WebhookEvent.objects.filter(pk=event.pk).update(state="sending", attempts=1, lease_until=past)
        assert webhooks_send_due() == 1
        [(_, headers, _)] = webhook_receiver.requests
        assert headers["X-PacsLens-Event-Id"] == str(event.event_id)
        event.refresh_from_db()
        assert (event.state, event.attempts) == ("sent", 2)

    def test_backoff_is_exponential_jittered_and_capped(self):
        row = WebhookEvent(attempts=1)
        assert backoff(row, 0.0) == timedelta(seconds=5) and backoff(row, 1.0) == timedelta(seconds=10)
        row.attempts = 4
        assert backoff(row, 1.0) == timedelta(seconds=80)
        row.attempts = 30
        assert backoff(row, 1.0) == timedelta(seconds=WebhookEvent.BACKOFF_CAP_SECONDS)

    def test_the_signature_is_the_hmac_of_timestamp_dot_body(self):
        expected = hmac.new(b"k" * 16, b"1700000000.{}", hashlib.sha256).hexdigest()
        assert signature("k" * 16, "1700000000", b"{}") == f"sha256={expected}"


class TestNoPatientData:
    def test_bodies_name_no_patient(self, data_dir, rule, mllp, webhook_receiver):
        subscribe(webhook_receiver)
        study, result = inferred_study(data_dir)
        Study.objects.filter(pk=study.pk).update(
            patient_name="ZZMARKER^WEBHOOK", patient_id="ZZPID0042", accession_number="ZZACC0042"
        )
        study.refresh_from_db()
        hl7_destination(rule, mllp.port, on_ack_error="fail")
        mllp.mode = "AE"
        deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        deliveries_run_pending()
        webhook_events_record(event_type="result.flagged", study=study, result=result)
        assert webhooks_send_due() == 2
        for _, headers, raw in webhook_receiver.requests:
            text = raw.decode() + json.dumps(headers)
            for marker in ("ZZMARKER", "ZZPID0042", "ZZACC0042"):
                assert marker not in text


def wakes() -> int:
    return sum(1 for row in OrmQ.objects.all() if row.task.get("func") == WEBHOOK_TASK)


class TestWaking:
    def test_the_timer_wakes_the_sender_when_an_event_falls_due(self, data_dir, webhook_receiver):
        subscribe(webhook_receiver)
        study, result = inferred_study(data_dir)
        [event] = webhook_events_record(event_type="result.flagged", study=study, result=result)
        WebhookEvent.objects.filter(pk=event.pk).update(next_attempt_at=timezone.now() + timedelta(seconds=30))
        OrmQ.objects.all().delete()
        timer = DueWakeThread()
        timer.once()
        assert wakes() == 0  # not due yet
        make_due()
        timer.once()
        timer.once()
        assert wakes() == 1  # once per due time
        assert webhooks_send_due() == 1

    def test_a_sweep_is_scheduled(self):
        assert ("results.delivery_tasks.send_webhooks", 1) in SCHEDULES
