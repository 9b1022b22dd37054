"""Claiming, retrying and settling small outbox rows (alert notifications, webhook events): one
copy of the rules the delivery ledger follows, for rows that need no circuit breaker or priority.

A row is due when it is pending and its `next_attempt_at` has come, or when it is being sent
and its lease has passed (its worker died). A worker claims it with a conditional UPDATE on its
state and attempt count, so of several workers one sends it; a failure puts it back with an
exponential, jittered, capped delay until `MAX_ATTEMPTS`, then it is `failed` for good.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import TypeVar

from django.db.models import F, Min, Q
from django.utils import timezone

from results.models.outbox import NotificationState, OutboxRow

Row = TypeVar("Row", bound=OutboxRow)


def outbox_due(now: datetime) -> Q:
    return Q(state=NotificationState.PENDING, next_attempt_at__lte=now) | Q(
        state=NotificationState.SENDING, lease_until__lt=now
    )


def outbox_due_at(model: type[OutboxRow]) -> datetime | None:
    """When the next row of `model` falls due (maybe already past); None when none waits."""
    rows = model._default_manager
    times = [
        rows.filter(state=NotificationState.PENDING).aggregate(due=Min("next_attempt_at"))["due"],
        rows.filter(state=NotificationState.SENDING).aggregate(due=Min("lease_until"))["due"],
    ]
    due = [t for t in times if t is not None]
    return min(due) if due else None


def outbox_claim_due(
    model: type[Row],
    *,
    lease: timedelta,
    limit: int = 100,
    related: Sequence[str] = (),
    now: datetime | None = None,
) -> Iterator[Row]:
    """The due rows of `model` this worker claimed, oldest due first; each is SENDING with
    `attempts` counting this try. Rows another worker claimed first are skipped."""
    now = now or timezone.now()
    due = outbox_due(now)
    for row in model._default_manager.filter(due).select_related(*related).order_by("next_attempt_at", "pk")[:limit]:
        claimed = (
            model._default_manager.filter(due, pk=row.pk, attempts=row.attempts).update(
                state=NotificationState.SENDING, lease_until=now + lease, attempts=F("attempts") + 1
            )
            == 1
        )
        if claimed:
            row.attempts += 1
            row.state = NotificationState.SENDING
            yield row


def outbox_settle(row: OutboxRow, *, error: str = "", give_up: bool = False) -> str:
    """Record a claimed row's try: sent, or back to pending after a backoff, or failed for good
    (`give_up`, or its attempts spent). Returns the row's new state."""
    now = timezone.now()
    claimed = type(row)._default_manager.filter(pk=row.pk, state=NotificationState.SENDING, attempts=row.attempts)
    if not error:
        claimed.update(state=NotificationState.SENT, sent_at=now, lease_until=None, last_error="")
        row.state = NotificationState.SENT
        return row.state
    failed = give_up or row.attempts >= row.MAX_ATTEMPTS
    row.state = NotificationState.FAILED if failed else NotificationState.PENDING
    claimed.update(
        state=row.state,
        next_attempt_at=now + backoff(row, random.random()),
        lease_until=None,
        last_error=error[:300],
    )
    return row.state


def backoff(row: OutboxRow, jitter: float) -> timedelta:
    """Exponential in the attempts made, capped; `jitter` (0..1) spreads it over its upper half,
    so the rows of one outage do not all come back in the same second."""
    delay = min(row.BACKOFF_CAP_SECONDS, row.BACKOFF_BASE_SECONDS * 2 ** max(row.attempts - 1, 0))
    return timedelta(seconds=delay * (0.5 + jitter / 2))
