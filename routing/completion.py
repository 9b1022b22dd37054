"""Study completeness: when has a sender finished sending a study?

DICOM has no "end of study" message, so we infer it (DESIGN.md):
- quiet period: no new instance for N seconds (per sending AE, site default otherwise);
- association release: every association that delivered to the study has ended, the last
  one released normally, and a short grace period passed (catches a sender that opens one
  association per series);
- forced ceiling: a study still receiving after this long completes anyway.
This runs in the workers, from database rows only, so it survives restarts and works with
several listeners.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django_q.tasks import async_task

from routing.models import Heartbeat, HeartbeatRole, Instance, StoreAssociation, Study, StudyRetrieve, StudyState

ACTIVE_RETRIEVE_STATES = [StudyRetrieve.State.PENDING, StudyRetrieve.State.RETRIEVING]
# A listener process that has not beaten for this long is gone: its associations that never ended
# are closed as aborted. Longer than /healthz's 30 s on purpose: a live listener whose beats a
# busy database delayed must not lose its associations (a supervisor closes a dead child's at once).
LISTENER_GONE_AFTER = timedelta(minutes=2)

logger = logging.getLogger(__name__)


def study_completion_reason(*, study: Study, now: datetime) -> str | None:
    """Why `study` counts as complete at `now`, or None while it may still be receiving."""
    ceiling = timedelta(seconds=settings.STUDY_FORCE_COMPLETE_AFTER)
    if now - study.first_received_at >= ceiling:
        return f"forced: still receiving {int(ceiling.total_seconds())} s after the first instance"
    if StudyRetrieve.objects.filter(study=study, state__in=ACTIVE_RETRIEVE_STATES).exists():
        return None  # a pull is under way (or will retry): its final response completes the study
    quiet = study.quiet_period(settings.STUDY_QUIET_PERIOD)
    if now - study.last_received_at >= quiet:
        return f"quiet period: no instance for {int(quiet.total_seconds())} s"
    grace = timedelta(seconds=settings.STUDY_RELEASE_GRACE)
    if now - study.last_received_at < grace:
        return None
    association_ids = set(
        Instance.objects.filter(study=study).exclude(association=None).values_list("association_id", flat=True)
    )
    associations = list(StoreAssociation.objects.filter(pk__in=association_ids))
    if not associations or any(a.ended_at is None for a in associations):
        return None
    last = max(associations, key=_ended_at)
    if not last.released_normally:
        return None  # an aborted association may be resent: wait for the quiet period
    return f"association released by {last.calling_ae_title}, nothing else delivering"


def _ended_at(association: StoreAssociation) -> datetime:
    """The sort key above: study_completion_reason checks first that every association has ended."""
    assert association.ended_at is not None
    return association.ended_at


def study_try_complete(*, study: Study, now: datetime | None = None) -> bool:
    """Complete `study` if its time has come. Safe to call from several workers at once."""
    now = now or timezone.now()
    if study.state != StudyState.RECEIVING:
        return False
    reason = study_completion_reason(study=study, now=now)
    if reason is None:
        return False
    # Compare-and-set on last_received_at: an instance that arrived meanwhile keeps it open.
    return study_complete(study=study, detail=reason, where=Q(last_received_at=study.last_received_at))


def study_complete(
    *, study: Study, detail: str, where: Q | None = None, from_states: Sequence[str] | None = None, kind: str = ""
) -> bool:
    """→ COMPLETE and enqueue its routing (which then wakes inference) once the transaction commits.

    The one way a study becomes complete, whatever decided it: quiet period, association
    release or ceiling here, a retrieve's final response in routing.pull.poll, or a staff re-run
    (study_request_rerun, from a finished state).
    """
    with transaction.atomic():
        moved = study.transition(
            StudyState.COMPLETE,
            from_states=from_states or [StudyState.RECEIVING],
            detail=detail,
            where=where,
            kind=kind,
        )
        if moved:
            study_id = study.pk
            transaction.on_commit(lambda: async_task("routing.tasks.route_study", study_id))
    if moved:
        logger.info("study %s complete: %s", study.pk, detail)
    return moved


# States a study may be re-run from: nothing is in flight for it.
RERUNNABLE = [StudyState.INFERRED, StudyState.DELIVERED, StudyState.CLOSED, StudyState.FAILED, StudyState.IGNORED]


def study_request_rerun(*, study: Study, actor: str) -> bool:
    """Route and infer a finished study again (after a rule or model change, or on request).

    The new results supersede the current ones. Returns False when the study is not in a
    finished state (still receiving, or work in flight): nothing is changed then.
    """
    return study_complete(study=study, detail=f"re-run requested by {actor}", from_states=RERUNNABLE, kind="rerun")


def studies_complete_due(*, now: datetime | None = None) -> int:
    """The sweep: complete every receiving study whose time has come. Returns how many."""
    completed = 0
    for study in Study.objects.filter(state=StudyState.RECEIVING).select_related("sender").order_by("last_received_at"):
        if study_try_complete(study=study, now=now):
            completed += 1
    return completed


def associations_completion_due(*, now: datetime | None = None, limit: int = 200) -> list[int]:
    """Ids of ended associations whose release grace has passed and whose completion check nobody
    was asked for yet; each is marked asked (compare-and-set) by this call, so once only."""
    now = now or timezone.now()
    due_before = now - timedelta(seconds=settings.STUDY_RELEASE_GRACE)
    candidates = StoreAssociation.objects.filter(completion_checked_at=None, ended_at__lte=due_before)
    claimed = []
    for association_id in candidates.order_by("ended_at").values_list("pk", flat=True)[:limit]:
        if StoreAssociation.objects.filter(pk=association_id, completion_checked_at=None).update(
            completion_checked_at=now
        ):
            claimed.append(association_id)
    return claimed


def associations_close_for(*, listener: str, now: datetime | None = None) -> int:
    """Close (as aborted) the associations a listener process left open when it died.

    Dated when we close them, not when the process may have died: an aborted association that
    ended last makes its study wait for the quiet period (the sender may send again), so a study
    completes on a release only if that release came after we knew of the death.
    """
    closed = StoreAssociation.objects.filter(listener=listener, ended_at=None).update(
        ended_at=now or timezone.now(), released_normally=False
    )
    if closed:
        logger.warning("closed %s association(s) of listener %s, which stopped", closed, listener)
    return closed


def associations_orphaned_close(*, now: datetime | None = None) -> int:
    """Close the open associations of listener processes that stopped beating (killed, host down)."""
    now = now or timezone.now()
    alive = set(
        Heartbeat.objects.filter(role=HeartbeatRole.LISTENER, beat_at__gte=now - LISTENER_GONE_AFTER).values_list(
            "identity", flat=True
        )
    )
    # Only associations older than the silence itself: a listener that just started may not have beaten yet.
    open_listeners = set(
        StoreAssociation.objects.filter(ended_at=None, started_at__lt=now - LISTENER_GONE_AFTER)
        .exclude(listener="")
        .values_list("listener", flat=True)
        .distinct()
    )
    return sum(associations_close_for(listener=listener, now=now) for listener in open_listeners - alive)
