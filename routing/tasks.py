"""django-q2 tasks of the routing app. Thin: ids in, a service call, nothing else.

A study hands on down the pipeline: completion enqueues `route_study`, which routes it and then
wakes inference by the task's dotted name (`results.tasks.infer_pending`): routing never
imports results.

Task arguments are pickled into the broker table, so they are ids only, never patient data.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django_q.tasks import async_task

from routing.completion import (
    associations_completion_due,
    associations_orphaned_close,
    studies_complete_due,
    study_try_complete,
)
from routing.models import StoreAssociation, Study, StudyState
from routing.rules import studies_route_lost, study_route
from routing.store.spool import incoming_sweep

# A COMPLETE study not routed after this long lost its task (worker killed, broker row lost).
ROUTING_IDLE = timedelta(minutes=1)
INFER_TASK = "results.tasks.infer_pending"


def enqueue_completion_check(association_id: int) -> None:
    """Called by the listener when an association ends (inside its transaction).

    With a release grace (the default: 2 s) the workers' due-time timer asks for the check when
    the grace has passed; without one, it is asked for now."""
    if settings.STUDY_RELEASE_GRACE > 0:
        return
    StoreAssociation.objects.filter(pk=association_id).update(completion_checked_at=timezone.now())
    transaction.on_commit(lambda: async_task("routing.tasks.check_completion_after_release", association_id))


def check_completion_after_release(association_id: int) -> int:
    """Complete the studies an ended association delivered, once the release grace period passed.

    Never waits in a worker slot: before the grace has passed it does nothing, and the workers'
    due-time timer (pacslens/ops/due_wake.py) asks again when it has.
    """
    association = StoreAssociation.objects.filter(pk=association_id).first()
    if association is None or association.ended_at is None:
        return 0
    now = timezone.now()
    if (now - association.ended_at).total_seconds() < settings.STUDY_RELEASE_GRACE:
        return 0
    StoreAssociation.objects.filter(pk=association_id, completion_checked_at=None).update(completion_checked_at=now)
    completed = 0
    study_ids = association.instance_set.values_list("study_id", flat=True).distinct()
    for study in Study.objects.filter(pk__in=list(study_ids)).select_related("sender"):
        completed += study_try_complete(study=study, now=now)
    return completed


def completion_checks_enqueue_due() -> int:
    """Ask a worker to check each association whose release grace has just passed (the timer's
    call, every fraction of a second). Claimed by compare-and-set, so each is asked for once."""
    count = 0
    for association_id in associations_completion_due():
        async_task("routing.tasks.check_completion_after_release", association_id)
        count += 1
    return count


def route_study(study_id: int) -> bool:
    """Enqueued when a study completes: route it if it still is COMPLETE, then wake inference,
    which takes the most urgent routed study (maybe another one: the database decides order)."""
    study = Study.objects.filter(pk=study_id, state=StudyState.COMPLETE).first()
    routed = study is not None and study_route(study=study) is not None
    async_task(INFER_TASK)
    return routed


def sweep_completion() -> int:
    """Scheduled: quiet periods and forced ceilings, anything a lost trigger missed, and complete
    studies whose routing task was lost. Associations of a listener that stopped beating are
    closed first (as aborted), so they hold no study back."""
    associations_orphaned_close()
    completed = studies_complete_due()
    if studies_route_lost(idle=ROUTING_IDLE):
        async_task(INFER_TASK)
    return completed


def sweep_incoming() -> int:
    """Scheduled: temporary files of receives cut off by a crash or an abort, an hour after their last write."""
    return incoming_sweep()
