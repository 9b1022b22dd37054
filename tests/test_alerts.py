"""Alerts: each condition starts and clears once, the text holds no patient data, and the alerts
reach a real SMTP server (aiosmtpd) and a real HTTP webhook receiver in each body shape."""

from __future__ import annotations

import threading
from datetime import datetime, time, timedelta

import pytest
from django.db import close_old_connections, connection
from django.utils import timezone

from pacslens.ops.alerts.conditions import expected_seconds_between, firing
from pacslens.ops.alerts.service import alert_send_test, alerts_check, alerts_evaluate, notifications_send_due
from results.models import (
    AlertChannel,
    AlertEvent,
    AlertNotification,
    AlertRule,
    AlertState,
    Destination,
    InferenceResult,
)
from routing.models import AuditEntry, Heartbeat, PollSource, StudyRetrieve
from tests.support.factories import make_destination, make_failed_delivery, make_model, make_result, make_study

pytestmark = pytest.mark.django_db
PATIENT = "ZZTEST^UI"  # make_study's patient name: must never reach an alert


def rule(condition: str, **values) -> AlertRule:
    AlertRule.objects.all().delete()  # the migration's default rules would fire too
    return AlertRule.objects.create(name=condition.replace("_", "-"), condition=condition, **values)


def email_channel(**values) -> AlertChannel:
    return AlertChannel.objects.create(name="it-team", kind="email", email_to="it@hospital.example", **values)


def texts() -> str:
    return " ".join(f"{e.title} {e.text}" for e in AlertEvent.objects.all())


class TestStartAndClearOnce:
    def test_failure_queue_starts_once_per_destination_and_clears(self, smtp_server):
        rule("failure_queue")
        email_channel()
        study = make_study(patient_name=PATIENT)
        result = make_result(study)
        ris, pacs = make_destination("ris"), make_destination("pacs", port=2576)
        first = make_failed_delivery(study, result, ris)
        make_failed_delivery(study, make_result(make_study(accession="ACC2"), score=0.1), pacs)

        assert alerts_check() == {"changed": 2, "sent": 2}
        assert alerts_check() == {"changed": 0, "sent": 0}  # still failing: nothing new
        subjects = sorted(msg["Subject"] for _, msg in smtp_server.messages)
        assert "1 delivery to pacs in the failure queue" in subjects[0] and "to ris" in subjects[1]
        body = smtp_server.messages[0][1].get_payload()
        assert "2 in all (pacs: 1, ris: 1)" in body and "1 permanent" in body

        Delivery = type(first)
        Delivery.objects.filter(pk=first.pk).update(state="discarded")
        assert alerts_check() == {"changed": 1, "sent": 1}
        assert "Resolved: failure queue empty (ris)" in smtp_server.messages[-1][1]["Subject"]
        assert alerts_check()["changed"] == 0
        assert PATIENT not in texts() and "ZZ0001" not in texts() and study.study_instance_uid not in texts()

    def test_circuit_breaker_opened_and_closed(self):
        rule("circuit_open")
        destination = make_destination("ris", consecutive_failures=5)
        Destination.objects.filter(pk=destination.pk).update(circuit_open_until=timezone.now() + timedelta(minutes=1))
        assert alerts_evaluate() == 1
        assert AlertEvent.objects.get().title == "Circuit breaker of ris open"
        Destination.objects.filter(pk=destination.pk).update(circuit_open_until=None)
        assert alerts_evaluate() == 1 and alerts_evaluate() == 0
        assert AlertEvent.objects.filter(kind="cleared", title__contains="closed again").exists()

    def test_a_retrieve_or_poll_that_failed_for_good(self):
        rule("pull_failed")
        source = PollSource.objects.create(name="vna", kind="dicomweb", dicomweb_url="http://127.0.0.1:9/dicom-web")
        record = StudyRetrieve.objects.create(source=source, study_instance_uid="1.2.3", state="failed")
        assert alerts_evaluate() == 1
        assert "1 retrieve from poll source vna failed for good" in AlertEvent.objects.get().text
        StudyRetrieve.objects.filter(pk=record.pk).update(state="discarded")
        PollSource.objects.filter(pk=source.pk).update(consecutive_failures=3)
        assert alerts_evaluate() == 0  # same subject, still failing: the polls now
        PollSource.objects.filter(pk=source.pk).update(consecutive_failures=0)
        assert alerts_evaluate() == 1 and AlertEvent.objects.filter(kind="cleared").count() == 1

    def test_disk_below_the_warning_level(self, settings, data_dir):
        rule("disk_low")
        settings.DISK_FREE_WARNING_MB = 2**40  # far more than any disk has
        settings.DISK_FREE_FLOOR_MB = 0
        assert alerts_evaluate() == 1 and "Disk space low" in AlertEvent.objects.get().title
        settings.DISK_FREE_WARNING_MB = 0
        assert alerts_evaluate() == 1

    def test_a_missing_heartbeat(self):
        rule("heartbeat_missing")
        Heartbeat.beat(role="listener", identity="host:1")
        Heartbeat.beat(role="workers", identity="host:2")
        Heartbeat.beat(role="tasks", identity="host:2")
        assert alerts_evaluate() == 0
        Heartbeat.objects.filter(role="listener").update(beat_at=timezone.now() - timedelta(minutes=5))
        assert alerts_evaluate() == 1
        assert AlertEvent.objects.get().title == "No listener heartbeat"
        Heartbeat.beat(role="listener", identity="host:1")
        assert alerts_evaluate() == 1

    def test_model_failure_rate_above_the_threshold(self):
        rule("model_failure_rate", threshold_percent=20, min_results=4)
        model = make_model()
        for index in range(4):
            study = make_study(accession=f"A{index}")
            InferenceResult.objects.create(
                study=study,
                model=model,
                model_name=model.name,
                model_version=model.version,
                model_sha256=model.sha256,
                status="failed" if index < 2 else "succeeded",
                failure_reason="model_error" if index < 2 else "",
            )
        assert alerts_evaluate() == 1
        assert AlertEvent.objects.get().title == "Model demo-bleed failing: 50 % of results"

    def test_flagged_share_outside_the_band(self):
        band = rule("flag_share", model_name="demo-bleed", min_share_percent=5, max_share_percent=40, min_results=4)
        scores = [0.9, 0.9, 0.9, 0.1]  # 75 % flagged
        for index, score in enumerate(scores):
            make_result(make_study(accession=f"A{index}"), score=score)
        assert firing(band)["demo-bleed"].title.startswith("Model demo-bleed flags 75 % of studies (above")
        assert alerts_evaluate() == 1
        for index in range(8):
            make_result(make_study(accession=f"B{index}"), score=0.1)  # 3 of 12: 25 %, inside
        assert alerts_evaluate() == 1 and AlertEvent.objects.filter(kind="cleared").exists()
        # Too few results in the window: not judged
        AlertRule.objects.filter(pk=band.pk).update(min_results=100, max_share_percent=10)
        band.refresh_from_db()
        assert firing(band) == {}

    def test_two_workers_evaluating_at_once_send_each_alert_once(self, transactional_db, smtp_server):
        rule("circuit_open")
        email_channel()
        destination = make_destination("ris")
        Destination.objects.filter(pk=destination.pk).update(circuit_open_until=timezone.now() + timedelta(hours=1))
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                close_old_connections()
                barrier.wait()
                alerts_check()
            except BaseException as exc:  # reported below
                errors.append(exc)
            finally:
                connection.close()

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert AlertEvent.objects.count() == 1 and AlertState.objects.get().active
        assert len(smtp_server.messages) == 1


class TestSenderSilence:
    def test_silence_counts_only_expected_hours(self, settings):
        settings.TIME_ZONE = "UTC"
        silent = AlertRule(
            name="ct1",
            condition="sender_silent",
            ae_title="CT1",
            hours=2,
            weekdays="mon,tue,wed,thu,fri",
            active_from=time(7),
            active_to=time(19),
        )
        friday_evening = datetime(2026, 11, 27, 18, 0, tzinfo=timezone.get_current_timezone())
        monday_morning = friday_evening + timedelta(days=2, hours=14)  # Monday 08:00
        assert expected_seconds_between(silent, friday_evening, monday_morning) == 2 * 3600
        assert expected_seconds_between(silent, monday_morning, monday_morning + timedelta(hours=1)) == 3600

    def test_it_starts_after_n_expected_hours_and_clears_on_receipt(self, settings):
        settings.TIME_ZONE = "UTC"
        silent = rule("sender_silent", ae_title="CT1", hours=1, weekdays="mon,tue,wed,thu,fri,sat,sun")
        study = make_study(calling="CT1", minutes_ago=10)
        assert alerts_evaluate() == 0
        type(study).objects.filter(pk=study.pk).update(last_received_at=timezone.now() - timedelta(hours=3))
        assert alerts_evaluate() == 1
        event = AlertEvent.objects.get()
        assert event.subject == "CT1" and "Nothing received from CT1 for 1 h" in event.title
        make_study(calling="CT1", accession="NEW")
        assert alerts_evaluate() == 1
        silent.refresh_from_db()
        assert not AlertState.objects.get(rule=silent).active

    def test_a_new_rule_does_not_fire_before_its_hours_passed(self):
        rule("sender_silent", ae_title="NEVER1", hours=1, weekdays="mon,tue,wed,thu,fri,sat,sun")
        assert alerts_evaluate() == 0


class TestChannels:
    def test_webhook_bodies_generic_slack_and_teams(self, webhook_receiver):
        rule("circuit_open")
        for fmt in ("generic", "slack", "teams"):
            AlertChannel.objects.create(name=fmt, kind="webhook", webhook_url=webhook_receiver.url, webhook_format=fmt)
        destination = make_destination("ris")
        Destination.objects.filter(pk=destination.pk).update(circuit_open_until=timezone.now() + timedelta(hours=1))
        assert alerts_check() == {"changed": 1, "sent": 3}
        generic = next(b for b in webhook_receiver.bodies if "source" in b)
        assert generic["state"] == "started" and generic["condition"] == "circuit_open" and generic["subject"] == "ris"
        slack = next(b for b in webhook_receiver.bodies if set(b) == {"text"})
        assert slack["text"].startswith("*[PacsLens ") and "Circuit breaker of ris open" in slack["text"]
        teams = next(b for b in webhook_receiver.bodies if b.get("type") == "message")
        card = teams["attachments"][0]
        assert card["contentType"] == "application/vnd.microsoft.card.adaptive"
        assert card["content"]["type"] == "AdaptiveCard" and "Circuit breaker" in card["content"]["body"][0]["text"]

    def test_a_channel_that_is_down_is_retried_and_sends_once(self, webhook_receiver):
        rule("circuit_open")
        channel = AlertChannel.objects.create(name="hook", kind="webhook", webhook_url=webhook_receiver.url)
        webhook_receiver.script = [503]
        destination = make_destination("ris")
        Destination.objects.filter(pk=destination.pk).update(circuit_open_until=timezone.now() + timedelta(hours=1))
        assert alerts_check() == {"changed": 1, "sent": 0}
        notification = AlertNotification.objects.get()
        assert notification.state == "pending" and notification.last_error == "the webhook answered HTTP 503"
        channel.refresh_from_db()
        assert channel.last_error == "the webhook answered HTTP 503" and "secret-part" not in channel.last_error
        assert notifications_send_due() == 0  # backing off
        assert notifications_send_due(now=timezone.now() + timedelta(minutes=5)) == 1
        assert notifications_send_due(now=timezone.now() + timedelta(hours=5)) == 0
        assert len(webhook_receiver.bodies) == 1

    def test_an_smtp_server_that_refuses_is_retried(self, smtp_server):
        rule("circuit_open")
        email_channel()
        smtp_server.refuse = True
        destination = make_destination("ris")
        Destination.objects.filter(pk=destination.pk).update(circuit_open_until=timezone.now() + timedelta(hours=1))
        assert alerts_check()["sent"] == 0
        assert "451" in AlertNotification.objects.get().last_error
        smtp_server.refuse = False
        assert notifications_send_due(now=timezone.now() + timedelta(minutes=5)) == 1
        assert len(smtp_server.messages) == 1
        recipients, message = smtp_server.messages[0]
        assert recipients == ["it@hospital.example"] and message["From"] == "pacslens@localhost"

    def test_send_test_alert(self, smtp_server, webhook_receiver):
        mail = email_channel()
        assert alert_send_test(channel=mail, actor="admin") == ""
        assert "Test alert" in smtp_server.messages[0][1]["Subject"]
        hook = AlertChannel.objects.create(name="hook", kind="webhook", webhook_url=webhook_receiver.url)
        webhook_receiver.script = [404]
        assert alert_send_test(channel=hook, actor="admin") == "the webhook answered HTTP 404"
        dead = AlertChannel.objects.create(name="dead", kind="webhook", webhook_url="http://127.0.0.1:9/x")
        assert alert_send_test(channel=dead, actor="admin") == "cannot reach the webhook (ConnectionError)"
        assert [e.detail for e in AuditEntry.objects.filter(action="test").order_by("at", "id")] == [
            "test alert sent",
            "failed: the webhook answered HTTP 404",
            "failed: cannot reach the webhook (ConnectionError)",
        ]

    def test_webhook_url_is_sealed_at_rest(self, webhook_receiver):
        channel = AlertChannel.objects.create(name="hook", kind="webhook", webhook_url=webhook_receiver.url)
        with connection.cursor() as cursor:
            cursor.execute("SELECT webhook_url FROM results_alertchannel WHERE id = %s", [channel.pk])
            stored = cursor.fetchone()[0]
        assert "secret-part" not in stored and AlertChannel.objects.get().webhook_url == webhook_receiver.url
