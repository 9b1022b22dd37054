"""Pulls that failed for good, and what staff do about them (the failure queue, the REST API).

A retrieve has failed for good when a permanent error or MAX_RETRIEVE_ATTEMPTS transient ones
put its StudyRetrieve row in FAILED: no automatic retry will come. A poll source is failing
when its last POLL_FAILING_AFTER polls failed; polls are retried automatically (with backoff),
so for a source staff either poll now or give up on it: stop polling it, with a reason (the
source is disabled, as on the Endpoints page, and can be enabled there again).

Retry puts the same row back in the queue and wakes a worker to run it; discard needs a reason.
Both are compare-and-set on the row's state and write the audit entry themselves, so every
caller (page, API) is audited the same way.
"""

from __future__ import annotations

from functools import partial

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone
from django_q.tasks import async_task

from routing.models import AuditAction, AuditEntry, PollSource, Study, StudyRetrieve

POLL_FAILING_AFTER = 3


class DiscardReasonRequired(ValueError):
    pass


def retrieves_failed() -> QuerySet[StudyRetrieve]:
    """Retrieves that failed for good and were not discarded, oldest first."""
    return (
        StudyRetrieve.objects.filter(state=StudyRetrieve.State.FAILED)
        .select_related("source", "study")
        .order_by("finished_at", "pk")
    )


def sources_failing() -> QuerySet[PollSource]:
    return PollSource.objects.filter(enabled=True, consecutive_failures__gte=POLL_FAILING_AFTER).order_by("name")


def retrieve_retry(*, retrieves: QuerySet[StudyRetrieve], actor: str, request=None) -> int:
    """Queue failed retrieves again (attempts start over) and wake a worker for each. Returns how many."""
    now = timezone.now()
    retried = []
    with transaction.atomic():
        for record in retrieves.filter(state=StudyRetrieve.State.FAILED).select_related("source"):
            updated = StudyRetrieve.objects.filter(pk=record.pk, state=StudyRetrieve.State.FAILED).update(
                state=StudyRetrieve.State.PENDING,
                attempts=0,
                next_attempt_at=now,
                lease_until=None,
                last_error=f"retry requested by {actor}"[:2000],
            )
            if updated != 1:
                continue  # another request retried or discarded it first
            retried.append(record.pk)
            AuditEntry.record(
                actor=actor,
                action=AuditAction.RETRY,
                obj=record,
                object_repr=f"retrieve from {record.source.name}",
                detail="retry of a failed retrieve",
                request=request,
            )
            _study_event(record, "retrieve_requeued", f"retrieve from {record.source.name}: retry requested by {actor}")
        for pk in retried:
            transaction.on_commit(partial(async_task, "routing.pull.poll.retrieve_run_one", pk))
    return len(retried)


def retrieve_discard(*, retrieve: StudyRetrieve, actor: str, reason: str, request=None) -> bool:
    """Give up on a failed retrieve, with the reason. False when it was no longer failed."""
    reason = reason.strip()
    if not reason:
        raise DiscardReasonRequired("A reason is required to discard a retrieve.")
    with transaction.atomic():
        updated = StudyRetrieve.objects.filter(pk=retrieve.pk, state=StudyRetrieve.State.FAILED).update(
            state=StudyRetrieve.State.DISCARDED, discarded_by=actor[:150], discard_reason=reason[:2000]
        )
        if updated:
            AuditEntry.record(
                actor=actor,
                action=AuditAction.DISCARD,
                obj=retrieve,
                object_repr=f"retrieve from {retrieve.source.name}",
                detail=f"reason: {reason}",
                request=request,
            )
            _study_event(retrieve, "retrieve_discarded", f"retrieve from {retrieve.source.name}: discarded by {actor}")
    return bool(updated)


def source_poll_now(*, source: PollSource, actor: str, request=None) -> bool:
    """Make a failing source due now (its backoff is skipped once); the next poll sweep polls it."""
    updated = PollSource.objects.filter(pk=source.pk, enabled=True).update(next_poll_at=timezone.now())
    if updated:
        AuditEntry.record(
            actor=actor,
            action=AuditAction.RETRY,
            obj=source,
            object_repr=source.name,
            detail=f"poll now, after {source.consecutive_failures} failed polls",
            request=request,
        )
    return bool(updated)


def source_stop(*, source: PollSource, actor: str, reason: str, request=None) -> bool:
    """Give up on a failing source: disable it, with the reason. False when it was already disabled."""
    reason = reason.strip()
    if not reason:
        raise DiscardReasonRequired("A reason is required to stop polling a source.")
    with transaction.atomic():
        updated = PollSource.objects.filter(pk=source.pk, enabled=True).update(enabled=False)
        if updated:
            AuditEntry.record(
                actor=actor,
                action=AuditAction.DISABLE,
                obj=source,
                object_repr=source.name,
                before={"enabled": True},
                after={"enabled": False},
                detail=f"stopped polling after {source.consecutive_failures} failed polls; reason: {reason}",
                request=request,
            )
    return bool(updated)


def _study_event(record: StudyRetrieve, kind: str, detail: str) -> None:
    study = record.study or Study.objects.filter(study_instance_uid=record.study_instance_uid).first()
    if study is not None:
        study.log_event(kind, detail[:1000])
