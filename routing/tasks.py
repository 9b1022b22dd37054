"""django-q2 tasks of the routing app. Thin: ids in, a service call, nothing else.

A study hands on down the pipeline: completion enqueues `route_study`, which routes it and then
wakes inference by the task's dotted name (`results.tasks.infer_pending`): routing never
imports results.

Task arguments are pickled into the broker table, so they are ids only, never patient data.
"""

from __future__ import annotations

import time
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django_q.tasks import async_task

from routing.completion import studies_complete_due, study_try_complete
from routing.models import StoreAssociation, Study, StudyState
from routing.rules import studies_route_lost, study_route
from routing.store.spool import incoming_sweep

# A COMPLETE study not routed after this long lost its task (worker killed, broker row lost).
ROUTING_IDLE = timedelta(minutes=1)
INFER_TASK = "results.tasks.infer_pending"


def enqueue_completion_check(association_id: int) -> None:
    """Called by the listener when an association ends (inside its transaction)."""
    transaction.on_commit(lambda: async_task("routing.tasks.check_completion_after_release", association_id))


def check_completion_after_release(association_id: int) -> int:
    """Complete the studies an ended association delivered, once the release grace period passed."""
    association = StoreAssociation.objects.filter(pk=association_id).first()
    if association is None:
        return 0
    ended_at = association.ended_at or timezone.now()
    # Wait out the (short, bounded) grace period here: django-q2 has no delayed tasks and its
    # scheduler only wakes every 30 s, which would make every study wait that long.
    remaining = settings.STUDY_RELEASE_GRACE - (timezone.now() - ended_at).total_seconds()
    if remaining > 0:
        time.sleep(min(remaining, settings.STUDY_RELEASE_GRACE))
    completed = 0
    study_ids = association.instance_set.values_list("study_id", flat=True).distinct()
    for study in Study.objects.filter(pk__in=list(study_ids)).select_related("sender"):
        completed += study_try_complete(study=study)
    return completed


def route_study(study_id: int) -> bool:
    """Enqueued when a study completes: route it if it still is COMPLETE, then wake inference,
    which takes the most urgent routed study (maybe another one: the database decides order)."""
    study = Study.objects.filter(pk=study_id, state=StudyState.COMPLETE).first()
    routed = study is not None and study_route(study=study) is not None
    async_task(INFER_TASK)
    return routed


def sweep_completion() -> int:
    """Scheduled: quiet periods and forced ceilings, anything a lost trigger missed, and complete
    studies whose routing task was lost."""
    completed = studies_complete_due()
    if studies_route_lost(idle=ROUTING_IDLE):
        async_task(INFER_TASK)
    return completed


def sweep_incoming() -> int:
    """Scheduled: temporary files of receives cut off by a crash or an abort, an hour after their last write."""
    return incoming_sweep()
