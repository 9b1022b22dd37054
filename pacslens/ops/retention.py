"""Retention: delete received pixel data once a study no longer needs it.

A study's files go PACSLENS_RETENTION_DAYS after it settled, and never before:
- `delivered`: every delivery of its current results succeeded;
- `closed`: staff discarded what was not delivered;
- `ignored`: no routing rule matched;
- `inferred` with no delivery at all (its rules have no destinations).
Failed studies, and any study with a pending, in-flight or failed delivery, keep their files
until staff resolve them. Only files are deleted: Instance rows stay (with `deleted_at` set),
and so do results, deliveries, attempts, events and audit rows.

Each study is claimed by re-checking its state and `state_changed_at` under a row lock in the
same transaction that marks its instances, so a study that was amended, re-run or re-delivered
meanwhile is skipped. Files are unlinked only after that commit: a crash in between leaves
unreferenced files (harmless), never a row pointing at data that is still needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from results.models import Delivery, DeliveryState
from routing.models import Instance, Study, StudyState

logger = logging.getLogger(__name__)

BATCH = 200  # studies per sweep; the next sweep continues
# Still needs the files: a delivery being sent (the SR lists its source images), or a failed one
# of a current result (staff may retry it). A failure of a superseded result was settled by its re-run.
UNRESOLVED = Q(state__in=[DeliveryState.PENDING, DeliveryState.IN_FLIGHT]) | Q(
    state=DeliveryState.FAILED, result__superseded_by__isnull=True
)


@dataclass
class RetentionSummary:
    studies: int = 0
    instances: int = 0
    bytes: int = 0
    missing_files: int = 0


def retention_sweep() -> int:
    """Scheduled task: returns how many studies had their pixel data deleted."""
    return studies_retention_run().studies


def studies_retention_run(
    *, now: datetime | None = None, days: float | None = None, batch: int = BATCH
) -> RetentionSummary:
    now = now or timezone.now()
    days = settings.RETENTION_DAYS if days is None else days
    summary = RetentionSummary()
    for study in studies_due(now=now, days=days)[:batch]:
        study_pixels_delete(study=study, now=now, days=days, summary=summary)
    if summary.studies:
        logger.info(
            "retention: pixel data of %s studies deleted (%s instances, %.1f MiB)",
            summary.studies,
            summary.instances,
            summary.bytes / 2**20,
        )
    return summary


def studies_due(*, now: datetime, days: float):
    """Settled studies older than the retention time that still have files on disk."""
    cutoff = now - timedelta(days=days)
    unresolved = Delivery.objects.filter(UNRESOLVED, study=OuterRef("pk"))
    any_delivery = Delivery.objects.filter(study=OuterRef("pk"))
    files_left = Instance.objects.filter(study=OuterRef("pk"), deleted_at=None)
    settled = Q(state__in=[StudyState.DELIVERED, StudyState.CLOSED, StudyState.IGNORED]) | Q(
        state=StudyState.INFERRED, has_deliveries=False
    )
    return (
        Study.objects.alias(
            has_unresolved=Exists(unresolved), has_deliveries=Exists(any_delivery), has_files=Exists(files_left)
        )
        .filter(
            settled, has_unresolved=False, has_files=True, state_changed_at__lte=cutoff, last_received_at__lte=cutoff
        )
        .order_by("state_changed_at", "pk")
    )


def study_pixels_delete(*, study: Study, now: datetime, days: float, summary: RetentionSummary | None = None) -> int:
    """Mark the study's instances deleted and unlink their files; 0 if the study moved meanwhile."""
    summary = summary if summary is not None else RetentionSummary()
    with transaction.atomic():
        # The claim: still in the state we judged, unchanged since, and nothing unresolved appeared.
        # The row lock (PostgreSQL; SQLite's IMMEDIATE transaction serialises writers anyway) makes
        # a concurrent transition wait until the instances are marked.
        still = Study.objects.select_for_update().filter(
            pk=study.pk, state=study.state, state_changed_at=study.state_changed_at
        )
        if not still.exists() or Delivery.objects.filter(UNRESOLVED, study=study).exists():
            return 0
        rows = list(Instance.objects.filter(study=study, deleted_at=None).values_list("pk", "path", "size"))
        Instance.objects.filter(pk__in=[pk for pk, _, _ in rows], deleted_at=None).update(deleted_at=now)
        size = sum(s for _, _, s in rows)
        study.log_event(
            "pixels_deleted",
            f"retention: pixel data of {len(rows)} instances ({size / 2**20:.1f} MiB) deleted "
            f"{_days(days)} after the study was {study.state}; results and timeline kept",
        )
    missing = 0
    for _, path, _ in rows:
        missing += not _unlink(path)
    summary.studies += 1
    summary.instances += len(rows)
    summary.bytes += size
    summary.missing_files += missing
    return len(rows)


def _unlink(relative: str) -> bool:
    if not relative:
        return False
    path = Path(settings.DATA_DIR) / relative
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:  # permissions, read-only mount: visible, and the row already says deleted
        logger.warning("retention: cannot delete instance file (%s)", type(exc).__name__)
        return False


def _days(days: float) -> str:
    return f"{days:g} day" + ("" if days == 1 else "s")
