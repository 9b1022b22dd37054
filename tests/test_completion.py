"""Study completeness: quiet period, association release, re-open on a late instance, ceiling."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from routing.completion import (
    associations_completion_due,
    associations_orphaned_close,
    studies_complete_due,
    study_try_complete,
)
from routing.models import ApplicationEntity, Heartbeat, HeartbeatRole, StoreAssociation, Study, StudyState
from routing.tasks import check_completion_after_release, sweep_completion
from tests.support.ct import make_ct
from tests.support.factories import receive

pytestmark = pytest.mark.django_db


def age(study, seconds):
    """Pretend the study's instances arrived `seconds` ago."""
    past = timezone.now() - timedelta(seconds=seconds)
    Study.objects.filter(pk=study.pk).update(first_received_at=past, last_received_at=past)
    study.refresh_from_db()
    return study


class TestQuietPeriod:
    def test_quiet_study_completes(self, data_dir, settings):
        settings.STUDY_QUIET_PERIOD = 30
        study = age(receive(data_dir, make_ct()), 31)
        assert study_try_complete(study=study)
        study.refresh_from_db()
        assert study.state == StudyState.COMPLETE
        event = study.events.get(kind="complete")
        assert "quiet period" in event.detail
        assert event.from_state == "receiving"

    def test_study_still_receiving_stays_open(self, data_dir, settings):
        settings.STUDY_QUIET_PERIOD = 30
        study = age(receive(data_dir, make_ct()), 10)
        assert not study_try_complete(study=study)
        assert Study.objects.get(pk=study.pk).state == StudyState.RECEIVING

    def test_quiet_period_per_sender(self, data_dir, settings):
        settings.STUDY_QUIET_PERIOD = 30
        ApplicationEntity.objects.create(ae_title="SLOWMOD", quiet_period_seconds=300)
        study = age(receive(data_dir, make_ct(), calling="SLOWMOD"), 60)
        assert not study_try_complete(study=study)

    def test_sweep_completes_every_due_study(self, data_dir, settings):
        settings.STUDY_QUIET_PERIOD = 30
        due = [age(receive(data_dir, make_ct()), 40) for _ in range(3)]
        fresh = receive(data_dir, make_ct())
        assert studies_complete_due() == 3
        assert {s.state for s in Study.objects.filter(pk__in=[s.pk for s in due])} == {"complete"}
        assert Study.objects.get(pk=fresh.pk).state == StudyState.RECEIVING

    def test_an_instance_arriving_meanwhile_keeps_it_open(self, data_dir, settings):
        settings.STUDY_QUIET_PERIOD = 30
        ds = make_ct()
        study = age(receive(data_dir, ds), 40)
        stale = Study.objects.get(pk=study.pk)
        receive(data_dir, make_ct(study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID))
        assert not study_try_complete(study=stale)  # compare-and-set on last_received_at
        assert Study.objects.get(pk=study.pk).state == StudyState.RECEIVING


class TestAssociationRelease:
    def make_association(self, ended_seconds_ago=None, released=True):
        row = StoreAssociation.objects.create(calling_ae_title="MODALITY1", called_ae_title="PACSLENS")
        if ended_seconds_ago is not None:
            row.ended_at = timezone.now() - timedelta(seconds=ended_seconds_ago)
            row.released_normally = released
            row.save()
        return row

    def test_release_completes_after_grace(self, data_dir, settings):
        settings.STUDY_RELEASE_GRACE = 0.2
        association = self.make_association()
        study = receive(data_dir, make_ct(), association)
        StoreAssociation.objects.filter(pk=association.pk).update(ended_at=timezone.now(), released_normally=True)
        # Too early: the task does not wait in its worker slot, and the timer has nothing due yet.
        assert check_completion_after_release(association.pk) == 0
        assert associations_completion_due() == []
        time.sleep(0.25)
        assert associations_completion_due() == [association.pk]
        assert associations_completion_due() == []  # claimed: asked for once
        assert check_completion_after_release(association.pk) == 1
        study.refresh_from_db()
        assert study.state == StudyState.COMPLETE
        assert "association released" in study.events.get(kind="complete").detail

    def test_another_open_association_keeps_it_open(self, data_dir, settings):
        settings.STUDY_RELEASE_GRACE = 0
        ds = make_ct()
        first = self.make_association()
        second = self.make_association()
        receive(data_dir, ds, first)
        receive(data_dir, make_ct(study_uid=ds.StudyInstanceUID), second)
        StoreAssociation.objects.filter(pk=first.pk).update(ended_at=timezone.now(), released_normally=True)
        assert check_completion_after_release(first.pk) == 0
        StoreAssociation.objects.filter(pk=second.pk).update(ended_at=timezone.now(), released_normally=True)
        assert check_completion_after_release(second.pk) == 1

    def test_aborted_association_waits_for_quiet_period(self, data_dir, settings):
        settings.STUDY_RELEASE_GRACE = 0
        association = self.make_association()
        study = receive(data_dir, make_ct(), association)
        StoreAssociation.objects.filter(pk=association.pk).update(ended_at=timezone.now(), released_normally=False)
        assert check_completion_after_release(association.pk) == 0
        assert Study.objects.get(pk=study.pk).state == StudyState.RECEIVING


class TestAssociationsOfAStoppedListener:
    def open_association(self, listener, started_seconds_ago=300):
        return StoreAssociation.objects.create(
            calling_ae_title="MODALITY1",
            called_ae_title="PACSLENS",
            listener=listener,
            started_at=timezone.now() - timedelta(seconds=started_seconds_ago),
        )

    def test_a_silent_listener_s_open_associations_are_closed_as_aborted(self, data_dir):
        gone = self.open_association("host:111")
        alive = self.open_association("host:222")
        young = self.open_association("host:333", started_seconds_ago=1)  # its listener may not have beaten yet
        Heartbeat.beat(role=HeartbeatRole.LISTENER, identity="host:222")
        Heartbeat.objects.create(
            role=HeartbeatRole.LISTENER, identity="host:111", beat_at=timezone.now() - timedelta(minutes=5)
        )
        assert associations_orphaned_close() == 1
        gone.refresh_from_db(), alive.refresh_from_db(), young.refresh_from_db()
        assert gone.ended_at is not None and not gone.released_normally
        assert alive.ended_at is None and young.ended_at is None

    def test_a_study_sent_again_completes_on_release_once_the_dead_association_is_closed(self, data_dir, settings):
        settings.STUDY_RELEASE_GRACE = 0
        ds = make_ct()
        dead = self.open_association("host:111")
        receive(data_dir, ds, dead)
        assert associations_orphaned_close() == 1  # no heartbeat from host:111
        resent = self.open_association("host:222", started_seconds_ago=1)
        study = receive(data_dir, make_ct(study_uid=ds.StudyInstanceUID), resent)
        StoreAssociation.objects.filter(pk=resent.pk).update(ended_at=timezone.now(), released_normally=True)
        assert check_completion_after_release(resent.pk) == 1
        assert Study.objects.get(pk=study.pk).state == StudyState.COMPLETE

    def test_a_release_before_the_death_was_known_waits_for_the_quiet_period(self, data_dir, settings):
        # The dead association may still be sent again: closed after the release, it is the last
        # to end, and it was aborted.
        settings.STUDY_RELEASE_GRACE = 0
        ds = make_ct()
        receive(data_dir, ds, self.open_association("host:111"))
        released = self.open_association("host:222", started_seconds_ago=1)
        study = receive(data_dir, make_ct(study_uid=ds.StudyInstanceUID), released)
        StoreAssociation.objects.filter(pk=released.pk).update(ended_at=timezone.now(), released_normally=True)
        assert check_completion_after_release(released.pk) == 0  # the dead listener's association looks open
        assert sweep_completion() == 0  # closes it, and the study still waits
        assert Study.objects.get(pk=study.pk).state == StudyState.RECEIVING


class TestLateAndForced:
    def test_late_instance_reopens_as_amended(self, data_dir, settings):
        settings.STUDY_QUIET_PERIOD = 30
        ds = make_ct()
        study = age(receive(data_dir, ds), 40)
        assert study_try_complete(study=study)
        receive(data_dir, make_ct(study_uid=ds.StudyInstanceUID))
        study.refresh_from_db()
        assert study.state == StudyState.RECEIVING
        amended = study.events.get(kind="amended")
        assert (amended.from_state, amended.to_state) == ("complete", "receiving")
        assert study.instances.count() == 2

    def test_forced_ceiling_catches_a_study_that_never_goes_quiet(self, data_dir, settings):
        settings.STUDY_QUIET_PERIOD = 30
        settings.STUDY_FORCE_COMPLETE_AFTER = 600
        ds = make_ct()
        study = receive(data_dir, ds)
        Study.objects.filter(pk=study.pk).update(first_received_at=timezone.now() - timedelta(seconds=601))
        study.refresh_from_db()
        assert study_try_complete(study=study)
        assert "forced" in Study.objects.get(pk=study.pk).events.get(kind="complete").detail


class TestPull:
    def test_a_study_being_retrieved_waits_for_the_retrieve_not_the_quiet_period(self, data_dir, settings):
        from routing.models import PollSource, StudyRetrieve

        settings.STUDY_QUIET_PERIOD = 30
        ds = make_ct()
        study = age(receive(data_dir, ds), 40)
        pacs = ApplicationEntity.objects.create(ae_title="PACS", host="127.0.0.1", port=104, may_query=True)
        source = PollSource.objects.create(name="pacs", pacs=pacs)
        retrieve = StudyRetrieve.objects.create(
            source=source, study_instance_uid=ds.StudyInstanceUID, study=study, state="retrieving"
        )
        assert not study_try_complete(study=study)
        retrieve.state = "done"
        retrieve.save()
        assert study_try_complete(study=study)
