"""Retention: pixel files go N days after every delivery of their study succeeded, never before."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from pacslens.ops.retention import (
    retention_sweep,
    studies_retention_run,
    study_pixels_delete,
)
from results.deliver.ledger import deliveries_create, deliveries_run_pending
from results.models import Delivery, DeliveryAttempt, InferenceResult
from routing.models import Study, StudyEvent, StudyState
from tests.support.factories import hl7_destination, inferred_study, receive
from tests.support.net import free_port

pytestmark = pytest.mark.django_db


def files_of(study: Study, data_dir: Path) -> list[Path]:
    return [data_dir / path for path in study.instances.values_list("path", flat=True)]


def age(study: Study, days: float) -> None:
    past = timezone.now() - timedelta(days=days)
    Study.objects.filter(pk=study.pk).update(state_changed_at=past, last_received_at=past)
    study.refresh_from_db()


def delivered_study(data_dir, rule, port) -> Study:
    study, result = inferred_study(data_dir, slices=2)
    deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
    deliveries_run_pending()
    study.refresh_from_db()
    return study


class TestWhatIsDeleted:
    def test_a_delivered_study_after_the_retention_time(self, data_dir, rule, mllp, settings):
        settings.RETENTION_DAYS = 7
        hl7_destination(rule, mllp.port)
        study = delivered_study(data_dir, rule, mllp.port)
        assert study.state == StudyState.DELIVERED
        files = files_of(study, data_dir)
        assert all(f.exists() for f in files)
        age(study, 8)

        assert retention_sweep() == 1
        assert not any(f.exists() for f in files)
        assert study.instances.filter(deleted_at=None).count() == 0
        event = study.events.get(kind="pixels_deleted")
        assert "2 instances" in event.detail and "7 days after the study was delivered" in event.detail
        # results, deliveries, attempts and the rest of the timeline stay
        assert InferenceResult.objects.filter(study=study).count() == 1
        assert Delivery.objects.filter(study=study, state="delivered").count() == 1
        assert DeliveryAttempt.objects.filter(delivery__study=study).count() == 1
        assert study.events.filter(kind="delivered").exists()
        assert retention_sweep() == 0  # nothing left to do

    def test_an_instance_sent_again_after_retention_is_stored_and_reopens_the_study(
        self, data_dir, rule, mllp, settings
    ):
        from pydicom import dcmread

        hl7_destination(rule, mllp.port)
        study = delivered_study(data_dir, rule, mllp.port)
        first = study.instances.order_by("pk").first()
        ds = dcmread(data_dir / first.path)
        age(study, 8)
        assert retention_sweep() == 1
        receive(data_dir, ds)  # the PACS forwards the study again
        first.refresh_from_db()
        assert first.deleted_at is None and (data_dir / first.path).exists()
        assert dcmread(data_dir / first.path).SOPInstanceUID == ds.SOPInstanceUID
        study.refresh_from_db()
        assert study.state == StudyState.RECEIVING
        assert "after retention" in study.events.filter(kind="amended").get().detail

    def test_an_ignored_study_and_an_inferred_study_without_destinations(self, data_dir, settings):
        settings.RETENTION_DAYS = 1
        ignored, _ = inferred_study(data_dir, slices=1)
        Study.objects.filter(pk=ignored.pk).update(state=StudyState.IGNORED)
        undelivered, _ = inferred_study(data_dir, slices=1)
        age(ignored, 2)
        age(undelivered, 2)
        summary = studies_retention_run()
        assert summary.studies == 2 and summary.instances == 2 and summary.missing_files == 0


class TestWhatIsKept:
    def test_not_before_the_retention_time(self, data_dir, rule, mllp, settings):
        settings.RETENTION_DAYS = 7
        hl7_destination(rule, mllp.port)
        study = delivered_study(data_dir, rule, mllp.port)
        age(study, 6.9)
        assert retention_sweep() == 0
        assert all(f.exists() for f in files_of(study, data_dir))

    def test_a_failed_delivery_keeps_the_study_until_resolved(self, data_dir, rule, settings):
        settings.RETENTION_DAYS = 0
        hl7_destination(rule, free_port(), max_attempts=1)  # nobody listens: fails at once
        study = delivered_study(data_dir, rule, 0)
        assert study.state == StudyState.FAILED
        age(study, 30)
        assert retention_sweep() == 0
        # staff discard it (resolved): the study is closed (not delivered) and becomes eligible
        from results.deliver.ledger import delivery_discard

        delivery_discard(delivery=Delivery.objects.get(study=study), actor="informaticist", reason="RIS retired")
        study.refresh_from_db()
        assert study.state == StudyState.CLOSED
        assert retention_sweep() == 1

    def test_a_pending_delivery_keeps_the_study(self, data_dir, rule, mllp, settings):
        settings.RETENTION_DAYS = 0
        hl7_destination(rule, mllp.port)
        study, result = inferred_study(data_dir, slices=1)
        deliveries_create(study=study, results=[result], rule_ids=[rule.pk])  # not run: pending
        Study.objects.filter(pk=study.pk).update(state=StudyState.DELIVERED)  # even if the state said otherwise
        age(study, 30)
        assert retention_sweep() == 0

    def test_a_study_that_moved_since_it_was_judged_is_skipped(self, data_dir, settings):
        settings.RETENTION_DAYS = 0
        study, _ = inferred_study(data_dir, slices=1)
        age(study, 1)
        judged = Study.objects.get(pk=study.pk)
        Study.objects.get(pk=study.pk).transition(StudyState.RECEIVING, detail="amended: a late instance")
        assert study_pixels_delete(study=judged, now=timezone.now(), days=0) == 0
        assert all(f.exists() for f in files_of(study, data_dir))
        assert not StudyEvent.objects.filter(kind="pixels_deleted").exists()

    def test_a_receiving_or_inferring_study_is_never_touched(self, data_dir, settings):
        settings.RETENTION_DAYS = 0
        for state in (
            StudyState.RECEIVING,
            StudyState.COMPLETE,
            StudyState.ROUTED,
            StudyState.INFERRING,
            StudyState.DELIVERING,
            StudyState.FAILED,
        ):
            study, _ = inferred_study(data_dir, slices=1)
            Study.objects.filter(pk=study.pk).update(state=state)
            age(study, 365)
        assert retention_sweep() == 0
