"""Pull ingestion: poll sources for new studies and retrieve each one once.

One poll of a source = claim it (conditional UPDATE on its lease and its last query time),
query (C-FIND or QIDO-RS), record every match as a StudyRetrieve row (unique per source and
study), then run the due retrieves, at most `max_studies_per_poll`, `max_concurrent_retrieves`
at a time. A retrieve counts the study complete when its final response arrives (not by
timer) and enqueues processing, as the completion sweep does for pushed studies.

Scheduling: django-q2's scheduler wakes every ~30 s, too coarse for a 2 s poll interval. So
one scheduled task, `poll_due_sources`, runs every minute and loops for about a minute,
claiming sources as they fall due. Trade-off: while a source falls due again within the
sweep (intervals under ~55 s), that loop keeps one worker busy, mostly sleeping; with only
slower sources it returns at once, and a poll may then start up to ~30 s late (the
scheduler's granularity). Overlapping loops (a slow run, a second worker) are harmless: the
lease lets only one of them poll a given source.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta
from typing import cast

from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models import Count, F, Q
from django.utils import timezone

from routing.completion import study_complete
from routing.models import (
    Instance,
    Poll,
    PollSource,
    StoreAssociation,
    Study,
    StudyRetrieve,
)
from routing.pull import dicomweb as pull_dicomweb
from routing.pull import dimse as pull_dimse
from routing.pull.types import FoundStudy, PullError, RetrieveOutcome

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 85.0  # a run of the 1-minute schedule starts up to ~30 s late: cover the gap to the next
DUE_SLACK = 2.0  # seconds: a source this close to due counts as due (at most 10 % of its interval)
MAX_CATCH_UP = timedelta(days=7)  # after a long outage; older studies are backfill's job
RETRIEVE_BACKOFF_BASE = 30.0
RETRIEVE_BACKOFF_CAP = 3600.0
MAX_RETRIEVE_ATTEMPTS = 5
SOURCE_BACKOFF_CAP = 900.0


def poll_due_sources(*, sweep_seconds: float = SWEEP_SECONDS) -> int:
    """Scheduled task: poll every due source, looping while a source is due before the next run."""
    deadline = time.monotonic() + sweep_seconds
    polled = 0
    while True:
        close_old_connections()
        polled += poll_due_once(deadline=deadline)
        remaining = deadline - time.monotonic()
        next_due = (
            PollSource.objects.filter(enabled=True)
            .order_by("next_poll_at")
            .values_list("next_poll_at", flat=True)
            .first()
        )
        if next_due is None or remaining <= 0:
            return polled
        wait = (next_due - timezone.now()).total_seconds() - DUE_SLACK
        if wait >= remaining:
            return polled  # the next scheduled run will find it due
        time.sleep(min(max(wait, 0.2), remaining))


def poll_due_once(*, now: datetime | None = None, deadline: float | None = None) -> int:
    """Claim and poll each source that is due now. Returns how many were polled."""
    now = now or timezone.now()
    polled = 0
    # A little early is fine: otherwise a run of the 1-minute schedule landing just before a
    # 60 s source falls due would skip it and double its interval.
    due = PollSource.objects.filter(enabled=True, next_poll_at__lte=now + timedelta(seconds=DUE_SLACK))
    for source_id, next_poll_at, interval in list(
        due.order_by("next_poll_at").values_list("pk", "next_poll_at", "interval_seconds")
    ):
        if next_poll_at > now + timedelta(seconds=min(DUE_SLACK, interval / 10)):
            continue
        source = source_claim(source_id=source_id)
        if source is not None:
            poll_source(source=source, deadline=deadline)
            polled += 1
    return polled


def source_claim(*, source_id: int, now: datetime | None = None) -> PollSource | None:
    """Lease a source for one poll, or None if another worker holds it or it queried too recently.

    Compare-and-set on the lease and on `last_query_at` as read: the minimum spacing between
    two queries holds even across workers and the backfill command.
    """
    now = now or timezone.now()
    source = PollSource.objects.select_related("pacs").filter(pk=source_id, enabled=True).first()
    if source is None:
        return None
    if source.last_query_at and now - source.last_query_at < timedelta(seconds=source.min_query_spacing_seconds):
        return None
    lease = timedelta(seconds=cast(int, settings.Q_CLUSTER["timeout"]))  # a killed task's lease expires with it
    updated = (
        PollSource.objects.filter(pk=source_id, last_query_at=source.last_query_at)
        .filter(Q(lease_until=None) | Q(lease_until__lt=now))
        .update(lease_until=now + lease, leased_by=_identity())
    )
    if updated != 1:
        return None
    source.lease_until, source.leased_by = now + lease, _identity()
    return source


def poll_source(*, source: PollSource, now: datetime | None = None, deadline: float | None = None) -> Poll:
    """One poll of a claimed source: query, record, retrieve. Always releases the lease."""
    now = now or timezone.now()
    since = max((source.watermark or now) - timedelta(hours=source.lookback_hours), now - MAX_CATCH_UP)
    poll = Poll.objects.create(source=source, started_at=now, window_from=since, window_to=now)
    try:
        PollSource.objects.filter(pk=source.pk).update(last_query_at=now)
        found = query(source=source, date_from=timezone.localtime(since).date(), date_to=None)
        found = [f for f in found if f.study_datetime is None or f.study_datetime >= since]
        poll.matches = len(found)
        poll.new = retrieves_record(source=source, found=found, origin="poll")
        poll.save(update_fields=["matches", "new"])
        poll.retrieved, poll.retrieve_failures = retrieves_run(
            source=source, limit=source.max_studies_per_poll, deadline=deadline
        )
    except PullError as exc:
        poll.status, poll.error = Poll.Status.FAILED, str(exc)[:2000]
    except Exception as exc:  # a bug or an unexpected library error: visible, without its text
        logger.exception("poll %s of source %s failed", poll.pk, source.pk)
        poll.status, poll.error = Poll.Status.FAILED, f"internal error ({type(exc).__name__}); see the worker log"
    else:
        poll.status = Poll.Status.PARTIAL if poll.retrieve_failures else Poll.Status.OK
    poll.finished_at = timezone.now()
    poll.save()
    _source_release(source=source, poll=poll)
    return poll


def query(*, source: PollSource, date_from: date, date_to: date | None, modality: str = "") -> list[FoundStudy]:
    modalities = [modality.upper()] if modality else source.modality_list
    return _protocol(source).query_studies(source, date_from=date_from, date_to=date_to, modalities=modalities)


def retrieves_record(*, source: PollSource, found: list[FoundStudy], origin: str) -> int:
    """A StudyRetrieve row per match; returns how many studies were new to this source.

    A study already held complete (pushed to us, or retrieved through another source) is recorded
    as done without a retrieve. A done study for which the PACS now reports more instances than
    we hold is queued again (late series); the ingest path acknowledges what we already have.
    """
    uids = [f.study_instance_uid for f in found]
    held = dict(
        Instance.objects.filter(study__study_instance_uid__in=uids)
        .values_list("study__study_instance_uid")
        .annotate(n=Count("pk"))
        .values_list("study__study_instance_uid", "n")
    )
    existing = {
        r.study_instance_uid: r for r in StudyRetrieve.objects.filter(source=source, study_instance_uid__in=uids)
    }
    new = 0
    now = timezone.now()
    for study in found:
        record = existing.get(study.study_instance_uid)
        have = held.get(study.study_instance_uid, 0)
        if record is None:
            new += 1
            already = study.instances is not None and have >= study.instances > 0
            StudyRetrieve.objects.get_or_create(
                source=source,
                study_instance_uid=study.study_instance_uid,
                defaults={
                    "origin": origin,
                    "study_datetime": study.study_datetime,
                    "instances_expected": study.instances,
                    "state": StudyRetrieve.State.DONE if already else StudyRetrieve.State.PENDING,
                    "last_error": "already held: not retrieved" if already else "",
                    "study": Study.objects.filter(study_instance_uid=study.study_instance_uid).first()
                    if already
                    else None,
                },
            )
        elif record.state == StudyRetrieve.State.DONE and study.instances and study.instances > have:
            StudyRetrieve.objects.filter(pk=record.pk, state=StudyRetrieve.State.DONE).update(
                state=StudyRetrieve.State.PENDING,
                attempts=0,
                next_attempt_at=now,
                instances_expected=study.instances,
                last_error=f"PACS now reports {study.instances} instances, we hold {have}: retrieving again",
            )
    return new


def retrieves_run(
    *,
    source: PollSource,
    limit: int,
    deadline: float | None = None,
    study_instance_uids: list[str] | None = None,
    on_done: Callable[[StudyRetrieve, RetrieveOutcome], None] | None = None,
) -> tuple[int, int]:
    """Claim and run up to `limit` due retrieves of `source`. Returns (succeeded, failed)."""
    now = timezone.now()
    due = (
        StudyRetrieve.objects.filter(source=source, next_attempt_at__lte=now)
        .filter(Q(state=StudyRetrieve.State.PENDING) | Q(state=StudyRetrieve.State.RETRIEVING, lease_until__lt=now))
        .order_by("next_attempt_at", "found_at", "pk")
    )
    if study_instance_uids is not None:
        due = due.filter(study_instance_uid__in=study_instance_uids)
    claimed: list[StudyRetrieve] = []
    for record in due[: limit * 2]:
        if len(claimed) < limit and _retrieve_claim(record, now=now):
            claimed.append(record)

    def run(record: StudyRetrieve) -> bool:
        try:
            if deadline is not None and time.monotonic() > deadline:
                StudyRetrieve.objects.filter(pk=record.pk).update(
                    state=StudyRetrieve.State.PENDING, lease_until=None, attempts=F("attempts") - 1
                )
                return False
            outcome = retrieve(record=record, source=source)
            if on_done:
                on_done(record, outcome)
            return outcome.ok
        finally:
            if threading.current_thread() is not threading.main_thread():
                connection.close()

    workers = max(1, min(source.max_concurrent_retrieves, len(claimed)))
    if workers == 1:
        results = [run(r) for r in claimed]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"retrieve-{source.pk}") as pool:
            results = list(pool.map(run, claimed))
    succeeded = sum(results)
    return succeeded, len(claimed) - succeeded


def retrieve_run_one(retrieve_id: int) -> bool:
    """Task enqueued when staff retry a failed retrieve (routing/pull/failed.py): run it now rather
    than at the source's next poll, which may be far off or failing. The claim in retrieves_run
    makes a duplicate task harmless."""
    record = StudyRetrieve.objects.filter(pk=retrieve_id, state=StudyRetrieve.State.PENDING).first()
    if record is None:
        return False
    source = PollSource.objects.select_related("pacs").get(pk=record.source_id)
    succeeded, _ = retrieves_run(source=source, limit=1, study_instance_uids=[record.study_instance_uid])
    return succeeded == 1


def retrieve(*, record: StudyRetrieve, source: PollSource) -> RetrieveOutcome:
    """Retrieve one claimed study, record the outcome, and complete the study on success."""
    association = None
    if source.kind == PollSource.Kind.DICOMWEB or source.retrieve_mode == PollSource.RetrieveMode.C_GET:
        # C-GET and WADO-RS deliver on our own connection: an association row ties the instances
        # to this retrieve. (A C-MOVE delivers through the listener, which records its own.)
        association = StoreAssociation.objects.create(
            calling_ae_title=source.label,
            called_ae_title=settings.AE_TITLE,
            peer_address=source.pacs.host if source.pacs is not None else source.dicomweb_url[:64],
            listener=f"pull:retrieve:{record.pk}",
        )
    try:
        outcome = _protocol(source).retrieve_study(
            source, record.study_instance_uid, association_id=association.pk if association else None
        )
    except PullError as exc:
        outcome = RetrieveOutcome(ok=False, status=exc.status, error=str(exc), permanent=exc.permanent)
    except Exception as exc:
        logger.exception("retrieve %s failed", record.pk)
        outcome = RetrieveOutcome(ok=False, status=None, error=f"internal error ({type(exc).__name__})")
    now = timezone.now()
    study = Study.objects.filter(study_instance_uid=record.study_instance_uid).first()
    if outcome.ok and study is None:
        outcome = RetrieveOutcome(
            ok=False,
            status=outcome.status,
            completed=outcome.completed,
            error="the PACS reported success but no instance of the study reached us",
        )
    if association is not None:
        StoreAssociation.objects.filter(pk=association.pk).update(
            ended_at=now,
            released_normally=outcome.ok,
            instances_received=Instance.objects.filter(association=association).count(),
        )
    fields = {
        "completed": outcome.completed,
        "failed": outcome.failed,
        "warning": outcome.warning,
        "last_status": outcome.status,
        "last_error": outcome.error[:2000],
        "lease_until": None,
        "study": study,
        "finished_at": now,
    }
    if outcome.ok:
        fields["state"] = StudyRetrieve.State.DONE
    elif outcome.permanent or record.attempts >= MAX_RETRIEVE_ATTEMPTS:
        fields["state"] = StudyRetrieve.State.FAILED
    else:
        fields["state"] = StudyRetrieve.State.PENDING
        fields["next_attempt_at"] = now + timedelta(
            seconds=_backoff(record.attempts, RETRIEVE_BACKOFF_BASE, RETRIEVE_BACKOFF_CAP)
        )
    StudyRetrieve.objects.filter(pk=record.pk).update(**fields)
    for name, value in fields.items():
        setattr(record, name, value)
    method = "WADO-RS" if source.kind == PollSource.Kind.DICOMWEB else source.retrieve_mode.upper()
    if study is not None and outcome.ok:
        study_complete(
            study=study,
            detail=f"retrieve finished: {method} from {source.name}, "
            f"{outcome.completed} instance(s), status {_status_text(source, outcome.status)}",
        )
    elif study is not None:
        study.log_event("retrieve_failed", f"{method} from {source.name}: {outcome.error}"[:1000])
    if not outcome.ok:
        logger.warning(
            "retrieve %s from source %s failed (attempt %s): %s", record.pk, source.pk, record.attempts, outcome.error
        )
    return outcome


# --- helpers ---------------------------------------------------------------------------------


def _protocol(source: PollSource):
    return pull_dicomweb if source.kind == PollSource.Kind.DICOMWEB else pull_dimse


def _retrieve_claim(record: StudyRetrieve, *, now: datetime) -> bool:
    lease = now + timedelta(seconds=cast(int, settings.Q_CLUSTER["timeout"]))
    updated = (
        StudyRetrieve.objects.filter(pk=record.pk, attempts=record.attempts)
        .filter(Q(state=StudyRetrieve.State.PENDING) | Q(state=StudyRetrieve.State.RETRIEVING, lease_until__lt=now))
        .update(state=StudyRetrieve.State.RETRIEVING, lease_until=lease, attempts=F("attempts") + 1, started_at=now)
    )
    if updated == 1:
        record.attempts += 1
        record.state = StudyRetrieve.State.RETRIEVING
    return updated == 1


def _source_release(*, source: PollSource, poll: Poll) -> None:
    now = timezone.now()
    if poll.status == Poll.Status.FAILED:
        failures = source.consecutive_failures + 1
        delay = _backoff(failures, float(source.interval_seconds), max(SOURCE_BACKOFF_CAP, source.interval_seconds))
        fields = {"consecutive_failures": failures, "next_poll_at": now + timedelta(seconds=delay)}
        logger.warning("poll %s of source %s failed: %s", poll.pk, source.pk, poll.error)
    else:
        # Period measured from the poll's start, so a slow retrieve does not stretch the interval.
        next_at = max(poll.started_at + timedelta(seconds=source.interval_seconds), now)
        fields = {"consecutive_failures": 0, "next_poll_at": next_at, "watermark": poll.started_at}
    PollSource.objects.filter(pk=source.pk, leased_by=source.leased_by).update(lease_until=None, leased_by="", **fields)
    for name, value in fields.items():
        setattr(source, name, value)


def _backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential with ±20 % jitter, capped."""
    return min(cap, base * 2 ** max(attempt - 1, 0)) * random.uniform(0.8, 1.2)


def _identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def _status_text(source: PollSource, status: int | None) -> str:
    if status is None:
        return "none"
    return f"HTTP {status}" if source.kind == PollSource.Kind.DICOMWEB else f"0x{status:04X}"
