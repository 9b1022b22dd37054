"""The delivery ledger against real peers: an MLLP listener, pynetdicom SCPs, Orthanc."""

from __future__ import annotations

import re
import threading
import time
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from results.deliver import lease, ledger
from results.deliver.identity import installation_current
from results.deliver.ledger import (
    DiscardReasonRequired,
    deliveries_create,
    deliveries_run_pending,
    delivery_claim_next,
    delivery_discard,
    delivery_retry,
    delivery_send,
)
from results.models import Delivery, DeliveryState, Destination, InferenceResult
from routing.models import ApplicationEntity, Study, StudyState
from tests.support.factories import dicom_destination, hl7_destination, inferred_study
from tests.support.fhir_router import TOKEN as ROUTER_TOKEN
from tests.support.fhir_server import TOKEN
from tests.support.mllp import MLLPListener

pytestmark = pytest.mark.django_db


@pytest.fixture
def scps(scp_factory):
    return scp_factory


def make_due(*deliveries):
    Delivery.objects.filter(pk__in=[d.pk for d in deliveries]).update(next_attempt_at=timezone.now())


class TestOutbox:
    def test_one_delivery_per_destination_with_fixed_keys(self, data_dir, rule, mllp):
        study, result = inferred_study(data_dir)
        hl7_destination(rule, mllp.port)
        dicom_destination(rule, 104)
        Destination.objects.create(name="unrouted", kind="hl7", host="x", port=1, hl7_message_type="ORU^R01")
        created = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        assert sorted(d.destination.name for d in created) == ["pacs", "ris"]
        study.refresh_from_db()
        assert study.state == StudyState.DELIVERING
        keys = {d.kind: d.idempotency_key for d in created}
        installation = installation_current()
        # MSH-10: 20 base32 characters, the first five naming this installation.
        assert re.fullmatch(f"{installation.tag}[A-Z2-7]{{15}}", keys["hl7"])
        # The SR SOP Instance UID: a UUID UID derived from this installation and the result's UUID.
        assert keys["dicom"] == f"2.25.{uuid.uuid5(installation.uuid, f'result/{result.uid}/sr-sop-instance').int}"

    def test_failed_results_are_not_delivered(self, data_dir, rule, mllp):
        study, result = inferred_study(data_dir)
        hl7_destination(rule, mllp.port)
        InferenceResult.objects.filter(pk=result.pk).update(status="failed")
        result.refresh_from_db()
        assert deliveries_create(study=study, results=[result], rule_ids=[rule.pk]) == []


class TestHL7Delivery:
    def test_it_delivers_and_settles_the_study(self, data_dir, rule, mllp):
        study, result = inferred_study(data_dir)
        hl7_destination(rule, mllp.port)
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        assert deliveries_run_pending() == 1
        delivery.refresh_from_db()
        assert delivery.state == DeliveryState.DELIVERED
        assert mllp.received == [delivery.idempotency_key]
        attempt = delivery.attempt_log.get()
        assert (attempt.outcome, attempt.code) == ("success", "AA")
        study.refresh_from_db()
        assert study.state == StudyState.DELIVERED
        assert {"delivering", "delivered"} <= set(study.events.values_list("kind", flat=True))

    def test_down_then_up_is_delivered_exactly_once(self, data_dir, rule, mllp):
        study, result = inferred_study(data_dir)
        port = mllp.port
        mllp.server.shutdown()
        mllp.server.server_close()  # the RIS is down
        hl7_destination(rule, port)
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        deliveries_run_pending()
        delivery.refresh_from_db()
        assert delivery.state == DeliveryState.PENDING
        assert delivery.last_error_class == "transient"
        assert delivery.next_attempt_at > timezone.now()
        assert deliveries_run_pending() == 0  # backing off: not due yet
        back = MLLPListener(port=port)
        try:
            make_due(delivery)
            deliveries_run_pending()
            delivery.refresh_from_db()
            assert delivery.state == DeliveryState.DELIVERED
            assert back.received == [delivery.idempotency_key]
            assert delivery.attempt_log.count() == 2
        finally:
            back.server.shutdown()
            back.server.server_close()

    def test_error_ack_fails_at_once_by_policy_then_staff_retry_reuses_the_key(self, data_dir, rule, mllp):
        study, result = inferred_study(data_dir)
        hl7_destination(rule, mllp.port, on_ack_error="fail")
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        mllp.mode = "AE"
        deliveries_run_pending()
        delivery.refresh_from_db()
        assert delivery.state == DeliveryState.FAILED
        assert delivery.last_error_class == "permanent"
        assert delivery.attempts == 1
        assert Study.objects.get(pk=study.pk).state == StudyState.FAILED
        mllp.mode = "AA"
        assert delivery_retry(deliveries=Delivery.objects.filter(pk=delivery.pk), actor="informaticist") == 1
        assert Study.objects.get(pk=study.pk).state == StudyState.DELIVERING
        deliveries_run_pending()
        delivery.refresh_from_db()
        assert delivery.state == DeliveryState.DELIVERED
        assert mllp.received == [delivery.idempotency_key] * 2  # same MSH-10 on the re-send
        assert Study.objects.get(pk=study.pk).state == StudyState.DELIVERED

    def test_transient_failures_stop_at_the_attempt_limit(self, data_dir, rule, mllp):
        study, result = inferred_study(data_dir)
        hl7_destination(rule, mllp.port, max_attempts=3, on_ack_reject="retry", breaker_threshold=100)
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        mllp.mode = "AR"
        for _ in range(3):
            make_due(delivery)
            deliveries_run_pending()
        delivery.refresh_from_db()
        assert delivery.state == DeliveryState.FAILED
        assert delivery.attempts == 3
        assert list(delivery.attempt_log.values_list("outcome", flat=True)) == ["transient"] * 3


class TestDicomDelivery:
    def test_sr_is_stored_and_associations_are_reused(self, data_dir, rule, scps):
        scp = scps()
        dicom_destination(rule, scp.port)
        created = []
        for _ in range(3):
            study, result = inferred_study(data_dir)
            created += deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        assert deliveries_run_pending() == 3
        assert set(Delivery.objects.values_list("last_error", flat=True)) == {""}
        assert sorted(scp.received) == sorted(d.idempotency_key for d in created)
        assert set(Delivery.objects.values_list("state", flat=True)) == {"delivered"}

    def test_rejected_association_goes_straight_to_the_failure_queue(self, data_dir, rule, scps):
        scp = scps(require_calling_aet=["SOMEONE"])
        dicom_destination(rule, scp.port)
        study, result = inferred_study(data_dir)
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        deliveries_run_pending()
        delivery.refresh_from_db()
        assert delivery.state == DeliveryState.FAILED
        assert delivery.attempts == 1
        assert delivery.last_error_class == "config_error"
        assert "A-ASSOCIATE-RJ" in delivery.attempt_log.get().code

    def test_refused_sr_is_permanent(self, data_dir, rule, scps):
        scp = scps(status=0xA900)
        dicom_destination(rule, scp.port)
        study, result = inferred_study(data_dir)
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        deliveries_run_pending()
        delivery.refresh_from_db()
        assert (delivery.state, delivery.last_error_class) == ("failed", "permanent")
        assert delivery.attempt_log.get().code == "0xA900"


class TestResilience:
    def test_a_dead_destination_trips_its_breaker_and_does_not_block_another(self, data_dir, rule, scps, mllp):
        dead = dicom_destination(rule, 1, breaker_threshold=2, max_attempts=10)  # nothing listens on port 1
        hl7_destination(rule, mllp.port)
        for _ in range(2):
            study, result = inferred_study(data_dir)
            deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        Delivery.objects.update(next_attempt_at=timezone.now())
        deliveries_run_pending()
        dead.refresh_from_db()
        assert dead.consecutive_failures == 2
        assert dead.circuit_open
        assert Delivery.objects.filter(destination__kind="hl7", state="delivered").count() == 2
        Delivery.objects.update(next_attempt_at=timezone.now())
        assert delivery_claim_next(worker="test") is None  # the open circuit hides the dead PACS's rows

    def test_the_timeline_shows_the_breaker_and_when_it_really_retries(self, data_dir, rule, scps):
        dead = dicom_destination(rule, 1, breaker_threshold=1, breaker_cooldown_seconds=600, backoff_base_seconds=1)
        study, result = inferred_study(data_dir)
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        deliveries_run_pending()
        dead.refresh_from_db()
        delivery.refresh_from_db()
        events = {e.kind: e.detail for e in study.events.all()}
        until = timezone.localtime(dead.circuit_open_until)
        assert events["circuit_open"] == (
            f"pacs: circuit open until {until:%H:%M:%S} after 1 failures in a row; its deliveries wait until then"
        )
        # Backoff alone would say about a second from now; the breaker holds it for ten minutes.
        assert f"retry at {until:%H:%M:%S} (held by the circuit breaker)" in events["delivery_retry"]
        assert delivery.next_attempt_at == dead.circuit_open_until == delivery.next_try_at
        # The PACS is back and the cool-down over: the next attempt gets through and closes the breaker.
        scp = scps()
        ApplicationEntity.objects.filter(pk=dead.application_entity_id).update(port=scp.port)
        Destination.objects.filter(pk=dead.pk).update(circuit_open_until=timezone.now() - timedelta(seconds=1))
        make_due(delivery)
        deliveries_run_pending()
        kinds = list(study.events.values_list("kind", flat=True))
        assert kinds[-3:] == ["circuit_closed", "delivered", "delivered"]
        assert study.events.get(kind="circuit_closed").detail == "pacs: circuit closed, the destination answers again"

    def test_a_killed_worker_s_claim_expires_and_is_sent_once_more_with_the_same_key(self, data_dir, rule, mllp):
        study, result = inferred_study(data_dir)
        hl7_destination(rule, mllp.port)
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        claimed = delivery_claim_next(worker="host:999")  # ... and then the worker was SIGKILLed
        assert claimed.state == DeliveryState.IN_FLIGHT
        assert delivery_claim_next(worker="other") is None  # the lease protects it meanwhile
        Delivery.objects.filter(pk=delivery.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
        deliveries_run_pending()
        delivery.refresh_from_db()
        assert delivery.state == DeliveryState.DELIVERED
        assert delivery.attempts == 2
        lost, sent = delivery.attempt_log.all()
        assert "lease expired" in lost.message and sent.outcome == "success"
        assert mllp.received == [delivery.idempotency_key]

    def test_stat_goes_before_routine(self, data_dir, rule, mllp):
        hl7_destination(rule, mllp.port)
        routine_study, routine = inferred_study(data_dir)
        stat_study, stat = inferred_study(data_dir)
        Study.objects.filter(pk=stat_study.pk).update(priority=0)
        stat_study.refresh_from_db()
        deliveries_create(study=routine_study, results=[routine], rule_ids=[rule.pk])
        [first] = deliveries_create(study=stat_study, results=[stat], rule_ids=[rule.pk])
        assert delivery_claim_next(worker="w").pk == first.pk


class TestDiscard:
    def test_discard_needs_a_reason_and_settles_the_study(self, data_dir, rule, mllp):
        study, result = inferred_study(data_dir)
        hl7_destination(rule, mllp.port, on_ack_error="fail")
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        mllp.mode = "AE"
        deliveries_run_pending()
        with pytest.raises(DiscardReasonRequired):
            delivery_discard(delivery=delivery, actor="informaticist", reason="  ")
        assert delivery_discard(delivery=delivery, actor="informaticist", reason="RIS order cancelled")
        delivery.refresh_from_db()
        assert (delivery.state, delivery.discarded_by) == ("discarded", "informaticist")
        # Discarded is not delivered: the study is closed, its timeline says why.
        study = Study.objects.get(pk=study.pk)
        assert study.state == StudyState.CLOSED
        assert study.events.last().detail == "closed without full delivery: 0 of 1 delivered, 1 discarded"

    def test_a_closed_study_is_out_of_the_delivery_latency_and_re_delivers(self, data_dir, rule, mllp):
        from pacslens.staff.dashboard_data import stage_latencies

        study, result = inferred_study(data_dir)
        hl7_destination(rule, mllp.port, on_ack_error="fail")
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        mllp.mode = "AE"
        deliveries_run_pending()
        delivery_discard(delivery=delivery, actor="informaticist", reason="RIS order cancelled")
        inferred_to_delivered = stage_latencies()[-1]
        assert (inferred_to_delivered.to_state, inferred_to_delivered.count) == ("delivered", 0)
        # Staff may still send it: the closed study goes back to delivering.
        Delivery.objects.filter(pk=delivery.pk).update(state="failed")
        delivery_retry(deliveries=Delivery.objects.filter(pk=delivery.pk), actor="informaticist")
        assert Study.objects.get(pk=study.pk).state == StudyState.DELIVERING


class TestFhirDelivery:
    def test_fhir_resend_never_duplicates(self, data_dir, rule, fhir_router):
        study, result = inferred_study(data_dir)
        destination = Destination.objects.create(
            name="fhir", kind="fhir", base_url=fhir_router.url, auth="bearer", secret=ROUTER_TOKEN
        )
        destination.rules.add(rule)
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        deliveries_run_pending()
        delivery.refresh_from_db()
        assert delivery.state == DeliveryState.DELIVERED, delivery.last_error
        delivery_retry(deliveries=Delivery.objects.filter(pk=delivery.pk), actor="test")
        deliveries_run_pending()
        (observation,) = fhir_router.search("Observation")
        assert observation["identifier"][0]["value"] == delivery.idempotency_key
        assert len(fhir_router.search("ImagingStudy")) == 1


class TestLease:
    @staticmethod
    def slow_fhir_delivery_claimed(data_dir, rule, fhir_server, monkeypatch, *, answer_after, timeout_seconds):
        """A FHIR delivery claimed by worker w1, to a server answering each request after
        `answer_after` seconds; the lease has no margin beyond the send's own allowance."""
        monkeypatch.setattr(lease, "LEASE_EXTRA_SECONDS", 0.0)
        answer = fhir_server.handle

        def slowly(request, method):
            time.sleep(answer_after)
            answer(request, method)

        monkeypatch.setattr(fhir_server, "handle", slowly)
        study, result = inferred_study(data_dir)
        destination = Destination.objects.create(
            name="fhir",
            kind="fhir",
            base_url=fhir_server.url,
            auth="bearer",
            secret=TOKEN,
            timeout_seconds=timeout_seconds,
        )
        destination.rules.add(rule)
        deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        return delivery_claim_next(worker="w1")

    # Transactional: the renewal thread has its own connection, which a test's open transaction would lock out.
    @pytest.mark.django_db(transaction=True)
    def test_the_lease_outlives_a_slow_fhir_send_of_three_requests(self, data_dir, rule, fhir_server, monkeypatch):
        # Each request answers just inside the timeout: the send takes about 3 timeouts, more
        # than one request's allowance. Without the margin, the lease must still cover it.
        delivery = self.slow_fhir_delivery_claimed(
            data_dir, rule, fhir_server, monkeypatch, answer_after=0.8, timeout_seconds=1.0
        )
        lease_until = delivery.lease_until

        outcome = delivery_send(delivery=delivery)

        assert outcome.ok and len(fhir_server.requests) == 3
        assert timezone.now() < lease_until  # no other worker could have claimed it mid-send
        assert delivery_claim_next(worker="w2") is None

    @pytest.mark.django_db(transaction=True)
    def test_the_lease_is_renewed_while_a_send_outlasts_it(self, data_dir, rule, fhir_server, monkeypatch):
        # A lease of 0.3 s against a send of about 1.5 s (three slow requests): only renewal
        # keeps another worker from taking the row over mid-send.
        monkeypatch.setattr(Destination, "send_seconds_max", lambda self: 0.3)
        delivery = self.slow_fhir_delivery_claimed(
            data_dir, rule, fhir_server, monkeypatch, answer_after=0.5, timeout_seconds=5.0
        )
        takeovers = []
        sending = threading.Event()

        def other_worker():
            while not sending.wait(0.05):
                if (claimed := delivery_claim_next(worker="w2")) is not None:
                    takeovers.append(claimed.pk)
            connection.close()

        thief = threading.Thread(target=other_worker)
        thief.start()
        try:
            outcome = delivery_send(delivery=delivery, context=ledger.RunContext(worker="w1"))
        finally:
            sending.set()
            thief.join()

        assert outcome.ok and len(fhir_server.requests) == 3
        assert takeovers == []
        delivery.refresh_from_db()
        assert delivery.state == DeliveryState.DELIVERED  # recorded by its own worker, the lease holder
        assert [a.worker for a in delivery.attempt_log.all()] == ["w1"]


class TestOrthanc:
    """Orthanc as the hospital PACS: the SR lands in the source study by C-STORE and by STOW-RS."""

    @pytest.mark.parametrize("kind", ["dicom", "dicomweb"])
    def test_sr_arrives_in_the_source_study_once(self, data_dir, rule, orthanc, kind):
        orthanc.clear()
        study, result = inferred_study(data_dir)
        if kind == "dicom":
            destination = dicom_destination(rule, orthanc.dicom_port, ae_title=orthanc.aet)
        else:
            destination = Destination.objects.create(name="pacs-web", kind="dicomweb", base_url=orthanc.dicomweb_url)
            destination.rules.add(rule)
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        deliveries_run_pending()
        delivery.refresh_from_db()
        assert delivery.state == DeliveryState.DELIVERED, delivery.last_error
        delivery_retry(deliveries=Delivery.objects.filter(pk=delivery.pk), actor="test")
        deliveries_run_pending()
        found = orthanc.find_instances({"SOPInstanceUID": delivery.idempotency_key})
        assert len(found) == 1
        tags = orthanc.instance_tags(found[0]["ID"])
        assert tags["StudyInstanceUID"] == study.study_instance_uid
        assert tags["Modality"] == "SR"
        assert tags["SeriesDescription"] == "PacsLens AI result"
        assert orthanc.instance_count() == 1


class TestCommands:
    @pytest.mark.django_db(transaction=True)
    def test_deliver_requeues_and_reports(self, data_dir, rule, mllp, capsys):
        from django.core.management import call_command

        study, result = inferred_study(data_dir)
        hl7_destination(rule, mllp.port)
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        deliveries_run_pending()
        import threading

        stop = threading.Event()

        def worker_run():  # a worker polling meanwhile, as run_workers would
            from django.db import connection

            while not stop.wait(0.2):
                deliveries_run_pending()
            connection.close()

        worker = threading.Thread(target=worker_run)
        worker.start()
        call_command("deliver", study.study_instance_uid, "--destination", "ris", "--wait", "20")
        stop.set()
        worker.join()
        out = capsys.readouterr().out
        assert "1 delivery(ies) re-queued" in out
        assert "ris" in out and "delivered" in out
        assert mllp.received == [delivery.idempotency_key] * 2

    def test_deliver_explains_bad_arguments(self, data_dir, rule):
        from django.core.management import CommandError, call_command

        study, _ = inferred_study(data_dir)
        with pytest.raises(CommandError, match="no destination named 'nope'"):
            call_command("deliver", study.study_instance_uid, "--destination", "nope")
        with pytest.raises(CommandError, match="no study"):
            call_command("deliver", "1.2.3")

    def test_study_status_lists_deliveries_and_attempts(self, data_dir, rule, mllp, capsys):
        import json

        from django.core.management import call_command

        study, result = inferred_study(data_dir)
        hl7_destination(rule, mllp.port)
        deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        deliveries_run_pending()
        call_command("study_status", study.study_instance_uid, "--json")
        data = json.loads(capsys.readouterr().out)
        [delivery] = data["deliveries"]
        assert delivery["state"] == "delivered"
        assert delivery["attempt_log"][0]["code"] == "AA"
        call_command("study_status", study.study_instance_uid)
        assert "-> ris (hl7): delivered" in capsys.readouterr().out
