"""Pull ingestion over DIMSE from a real Orthanc: C-FIND + C-MOVE into our listener, C-FIND + C-GET."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from django.utils import timezone

from routing.models import ApplicationEntity, Instance, Poll, PollSource, StoreAssociation, Study, StudyRetrieve
from routing.pull.poll import poll_due_once, poll_due_sources, source_claim
from routing.receive.listener import DicomListener
from tests.support.net import free_port
from tests.support.pull import OUR_AE, assert_no_patient_data, make_source, orthanc_study, poll_now, route_study_tasks

pytestmark = [pytest.mark.interop]


@pytest.fixture
def listener(pacs, orthanc):
    """Our real listener in-thread, registered in Orthanc as the C-MOVE destination."""
    dicom = DicomListener(host="127.0.0.1", port=0, ae_title=OUR_AE)
    dicom.start()
    orthanc.add_modality("pacslens", OUR_AE, "127.0.0.1", dicom.port)
    yield dicom
    dicom.stop(grace=2)


class TestCMove:
    def test_studies_appear_once_complete_and_are_enqueued(self, listener, pacs, orthanc, caplog):
        caplog.set_level(logging.DEBUG)
        first, second = orthanc_study(orthanc, 3), orthanc_study(orthanc, 2)
        source = make_source(pacs, retrieve_mode="c-move")

        poll = poll_now(source)

        assert (poll.status, poll.matches, poll.new, poll.retrieved, poll.retrieve_failures) == ("ok", 2, 2, 2, 0)
        for uid, count in ((first, 3), (second, 2)):
            study = Study.objects.get(study_instance_uid=uid)
            assert study.state == "complete"
            assert study.instances.count() == count
            event = study.events.get(kind="complete")
            assert event.detail.startswith("retrieve finished: C-MOVE from orthanc")
            assert study.calling_ae_title == orthanc.aet  # delivered by the PACS through the listener
            record = StudyRetrieve.objects.get(study_instance_uid=uid)
            assert (record.state, record.attempts, record.completed, record.study_id) == ("done", 1, count, study.pk)
        ids = sorted(Study.objects.values_list("pk", flat=True))
        assert sorted(args[0] for args in route_study_tasks()) == ids

        again = poll_now(source)

        assert (again.status, again.matches, again.new, again.retrieved) == ("ok", 2, 0, 0)
        assert Instance.objects.count() == 5
        assert set(StudyRetrieve.objects.values_list("attempts", flat=True)) == {1}
        assert len(route_study_tasks()) == 2
        assert_no_patient_data(caplog.text, *Poll.objects.values_list("error", flat=True))

    def test_refused_move_is_visible_and_retried_with_backoff(self, listener, pacs, orthanc):
        uid = orthanc_study(orthanc, 1)
        source = make_source(pacs, move_destination="NOSUCHAE")

        poll = poll_now(source)

        assert (poll.status, poll.retrieved, poll.retrieve_failures) == ("partial", 0, 1)
        record = StudyRetrieve.objects.get(study_instance_uid=uid)
        # Orthanc answers 0xC000 (0xA801 from other PACSs is permanent at once).
        assert (record.state, record.attempts, record.last_status) == ("pending", 1, 0xC000)
        assert record.next_attempt_at > timezone.now()
        assert "C-MOVE from ORTHANC: status 0xC000" in record.last_error
        assert "NOSUCHAE" in record.last_error
        assert not Study.objects.exists()

        assert poll_now(source).retrieved == 0  # not due yet: no retry inside the backoff
        assert StudyRetrieve.objects.get(pk=record.pk).attempts == 1


class TestCGet:
    def test_c_get_ingests_completes_and_records_the_association(self, pacs, orthanc):
        uid = orthanc_study(orthanc, 3)
        source = make_source(pacs, retrieve_mode="c-get")

        poll = poll_now(source)

        assert (poll.status, poll.matches, poll.new, poll.retrieved) == ("ok", 1, 1, 1)
        study = Study.objects.get(study_instance_uid=uid)
        assert study.state == "complete"
        assert study.events.get(kind="complete").detail.startswith("retrieve finished: C-GET from orthanc")
        association = StoreAssociation.objects.get(listener__startswith="pull:retrieve:")
        assert (association.instances_received, association.released_normally) == (3, True)
        assert set(study.instances.values_list("association_id", flat=True)) == {association.pk}
        assert route_study_tasks() == [(study.pk,)]

        assert poll_now(source).retrieved == 0
        assert Instance.objects.count() == 3

    def test_study_already_held_is_not_retrieved(self, pacs, orthanc):
        uid = orthanc_study(orthanc, 2)
        source = make_source(pacs, retrieve_mode="c-get", name="first")
        poll_now(source)
        other = make_source(pacs, retrieve_mode="c-get", name="second")

        poll = poll_now(other)

        assert (poll.matches, poll.new, poll.retrieved) == (1, 1, 0)
        record = other.retrieves.get(study_instance_uid=uid)
        assert (record.state, record.attempts) == ("done", 0)


class TestFailuresAndLimits:
    def test_pacs_down_fails_visibly_then_recovers(self, pacs, orthanc):
        orthanc_study(orthanc, 1)
        real_port = pacs.port
        ApplicationEntity.objects.filter(pk=pacs.pk).update(port=free_port())  # nothing listens there
        source = make_source(pacs, retrieve_mode="c-get", interval_seconds=2)

        failed = poll_now(source)

        assert failed.status == "failed"
        assert "cannot reach ORTHANC" in failed.error
        assert_no_patient_data(failed.error)
        source.refresh_from_db()
        assert source.consecutive_failures == 1 and source.lease_until is None
        assert source.next_poll_at > timezone.now()

        ApplicationEntity.objects.filter(pk=pacs.pk).update(port=real_port)
        recovered = poll_now(source)

        assert (recovered.status, recovered.retrieved) == ("ok", 1)
        source.refresh_from_db()
        assert source.consecutive_failures == 0

    def test_studies_per_poll_and_query_spacing_hold(self, pacs, orthanc):
        for _ in range(3):
            orthanc_study(orthanc, 1)
        source = make_source(
            pacs, retrieve_mode="c-get", max_studies_per_poll=2, min_query_spacing_seconds=60, interval_seconds=1
        )

        first = poll_now(source)
        assert (first.matches, first.new, first.retrieved) == (3, 3, 2)
        assert StudyRetrieve.objects.filter(state="pending").count() == 1

        # Due again (1 s interval) but within the minimum spacing: no query is sent.
        PollSource.objects.filter(pk=source.pk).update(next_poll_at=timezone.now())
        assert poll_due_once() == 0
        assert source_claim(source_id=source.pk) is None
        assert Poll.objects.count() == 1

        PollSource.objects.filter(pk=source.pk).update(last_query_at=timezone.now() - timedelta(seconds=61))
        assert poll_due_once() == 1
        second = Poll.objects.first()
        assert (second.matches, second.new, second.retrieved) == (3, 0, 1)
        assert Instance.objects.count() == 3

    def test_concurrent_retrieves_each_study_once(self, pacs, orthanc):
        uids = [orthanc_study(orthanc, 2) for _ in range(3)]
        source = make_source(pacs, retrieve_mode="c-get", max_studies_per_poll=3, max_concurrent_retrieves=2)

        poll = poll_now(source)

        assert (poll.retrieved, poll.retrieve_failures) == (3, 0)
        assert set(Study.objects.values_list("study_instance_uid", "state")) == {(u, "complete") for u in uids}
        assert Instance.objects.count() == 6
        assert StoreAssociation.objects.filter(listener__startswith="pull:retrieve:").count() == 3

    def test_two_workers_never_hold_one_source(self, pacs):
        source = make_source(pacs)
        assert source_claim(source_id=source.pk) is not None
        assert source_claim(source_id=source.pk) is None  # leased


class TestScheduledSweep:
    def test_sweep_polls_a_fast_source_and_retrieves(self, pacs, orthanc):
        uid = orthanc_study(orthanc, 2)
        make_source(pacs, retrieve_mode="c-get", interval_seconds=1, min_query_spacing_seconds=1)

        polled = poll_due_sources(sweep_seconds=2.5)

        assert polled >= 1
        assert Study.objects.get(study_instance_uid=uid).state == "complete"
        assert StudyRetrieve.objects.get().attempts == 1
        source = PollSource.objects.get()
        assert source.lease_until is None and source.next_poll_at > source.last_query_at
