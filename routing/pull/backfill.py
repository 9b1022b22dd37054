"""Backfill: pull a historical date range from a poll source, throttled and resumable.

The range is walked one Study Date at a time. A Backfill row keeps the first day not yet done,
so an interrupted run (Ctrl-C, a killed process) resumes there; StudyRetrieve rows (one per
source and study) make sure a study already retrieved, by a poll or an earlier run, is not
retrieved again. Queries respect the source's minimum spacing, shared with the polls through
`last_query_at`; retrieves run `max_concurrent_retrieves` at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from django.utils import timezone

from routing.models import Backfill, Poll, PollSource, StudyRetrieve
from routing.pull.poll import query, retrieves_record, retrieves_run
from routing.pull.types import PullError


@dataclass
class BackfillProgress:
    days_total: int
    days_done: int = 0
    studies_found: int = 0
    studies_new: int = 0
    retrieved: int = 0
    failed: int = 0
    interrupted: bool = False
    error: str = ""


def backfill_run(
    *,
    source: PollSource,
    date_from: date,
    date_to: date,
    modality: str = "",
    dry_run: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    report: Callable[[BackfillProgress], None] = lambda progress: None,
) -> BackfillProgress:
    """Query each day of the range and retrieve what we do not hold yet. Safe to re-run."""
    record = None
    start = date_from
    if not dry_run:
        record = (
            Backfill.objects.filter(
                source=source, date_from=date_from, date_to=date_to, modality=modality, finished_at=None
            )
            .order_by("-started_at")
            .first()
        )
        if record is None:
            record = Backfill.objects.create(
                source=source, date_from=date_from, date_to=date_to, modality=modality, next_date=date_from
            )
        start = record.next_date
    progress = BackfillProgress(days_total=(date_to - date_from).days + 1, days_done=(start - date_from).days)
    day = start
    while day <= date_to:
        if should_stop():  # checked between days too: a day either finishes or is redone
            progress.interrupted = True
            break
        try:
            _wait_for_query_slot(source)
            found = query(source=source, date_from=day, date_to=day, modality=modality)
        except PullError as exc:
            progress.error = f"{day:%Y-%m-%d}: {exc}"
            break
        progress.studies_found += len(found)
        if record is not None:  # not a dry run
            poll = Poll.objects.create(
                source=source,
                kind="backfill",
                matches=len(found),
                window_from=_aware(day),
                window_to=_aware(day + timedelta(days=1)),
            )
            poll.new = retrieves_record(source=source, found=found, origin="backfill")
            progress.studies_new += poll.new
            poll.retrieved, poll.retrieve_failures = _retrieve_day(
                source, [f.study_instance_uid for f in found], progress, should_stop, report
            )
            poll.status = Poll.Status.PARTIAL if poll.retrieve_failures else Poll.Status.OK
            poll.finished_at = timezone.now()
            poll.save()
            if progress.interrupted:
                break  # this day is not done: the next run queries it again
            Backfill.objects.filter(pk=record.pk).update(
                next_date=day + timedelta(days=1),
                queried_through=day,
                studies_found=record.studies_found + progress.studies_found,
                studies_retrieved=record.studies_retrieved + progress.retrieved,
            )
        day += timedelta(days=1)
        progress.days_done += 1
        report(progress)
    if record is not None and day > date_to and not progress.error:
        Backfill.objects.filter(pk=record.pk).update(finished_at=timezone.now())
    return progress


def _retrieve_day(
    source: PollSource,
    uids: list[str],
    progress: BackfillProgress,
    should_stop: Callable[[], bool],
    report: Callable[[BackfillProgress], None],
) -> tuple[int, int]:
    retrieved = failed = 0
    while True:
        ok, bad = retrieves_run(source=source, limit=source.max_concurrent_retrieves, study_instance_uids=uids)
        if ok + bad == 0:
            break  # nothing due: all done, or failures waiting out their backoff (the polls retry them)
        retrieved, failed = retrieved + ok, failed + bad
        progress.retrieved, progress.failed = progress.retrieved + ok, progress.failed + bad
        report(progress)
        if should_stop():
            # Stopped with work left on this day: it is not done (the next run queries it again).
            progress.interrupted = StudyRetrieve.objects.filter(
                source=source,
                study_instance_uid__in=uids,
                state=StudyRetrieve.State.PENDING,
                next_attempt_at__lte=timezone.now(),
            ).exists()
            break
    return retrieved, failed


def _wait_for_query_slot(source: PollSource) -> None:
    """Claim the next query slot of the source (compare-and-set on last_query_at), sleeping as needed."""
    spacing = timedelta(seconds=source.min_query_spacing_seconds)
    while True:
        last = PollSource.objects.filter(pk=source.pk).values_list("last_query_at", flat=True).get()
        now = timezone.now()
        if last and now - last < spacing:
            time.sleep((spacing - (now - last)).total_seconds())
            continue
        if PollSource.objects.filter(pk=source.pk, last_query_at=last).update(last_query_at=now):
            return


def _aware(day: date):
    return timezone.make_aware(datetime(day.year, day.month, day.day))


def pending_for(source: PollSource) -> int:
    return StudyRetrieve.objects.filter(source=source, state=StudyRetrieve.State.PENDING).count()
