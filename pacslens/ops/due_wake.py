"""Wake the workers when work falls due, not when the scheduler next looks.

django-q2's scheduler wakes every ~30 s and has no delayed tasks, so work with a due time (a
delivery whose backoff or breaker cool-down ends, a study whose release grace ends) would wait
for the next minute sweep. `run_workers` runs this thread beside the cluster: it looks at the
database a few times a second (two indexed queries) and enqueues the thin task that does the
work as soon as something is due:

- a pending delivery whose `next_attempt_at` has come and whose destination's breaker is closed,
  or an in-flight one whose lease expired (its worker died): `deliver_pending`;
- an association whose release grace has passed: `check_completion_after_release` for it;
- a webhook event whose retry time came, or whose sender's lease expired: `send_webhooks`.

The sweeps stay as the safety net (a lost task, a timer that was not running). The rows stay the
truth: an enqueued task only says "look now", and a duplicate finds nothing to claim.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django.db.models import Min, Q
from django.utils import timezone
from django_q.models import OrmQ
from django_q.tasks import async_task

from results.models import Delivery, DeliveryState, WebhookEvent
from results.outbox import outbox_due_at
from routing.tasks import completion_checks_enqueue_due

logger = logging.getLogger(__name__)

TICK_SECONDS = 0.25  # how often the database is asked; bounds how late due work starts
REPEAT_AFTER = timedelta(seconds=2)  # a due delivery still unclaimed after this gets another wake-up
DELIVER_TASK = "results.delivery_tasks.deliver_pending"
WEBHOOK_TASK = "results.delivery_tasks.send_webhooks"


def delivery_due_at(now: datetime) -> datetime | None:
    """When the most urgent claimable delivery falls due (maybe already past); None when none waits."""
    pending = Delivery.objects.filter(state=DeliveryState.PENDING, destination__enabled=True)
    # A row behind an open breaker is due when the breaker's cool-down ends, not before.
    behind_breaker = pending.filter(destination__circuit_open_until__gt=now).aggregate(
        due=Min("destination__circuit_open_until")
    )["due"]
    free = pending.filter(Q(destination__circuit_open_until=None) | Q(destination__circuit_open_until__lte=now))
    candidates = [
        behind_breaker,
        free.aggregate(due=Min("next_attempt_at"))["due"],
        Delivery.objects.filter(state=DeliveryState.IN_FLIGHT).aggregate(due=Min("lease_until"))["due"],
    ]
    due = [each for each in candidates if each is not None]
    return min(due) if due else None


class DueWakeThread(threading.Thread):
    """The timer: enqueues the thin tasks whose work is due. Stop with `stop()`."""

    def __init__(self, tick: float = TICK_SECONDS) -> None:
        super().__init__(name="due-wake", daemon=True)
        self.tick = tick
        self._stop_event = threading.Event()
        self._delivery_woken_at: datetime | None = None
        self._delivery_woken_for: datetime | None = None  # the due time that wake-up was for
        self._webhook_woken_for: datetime | None = None
        self.wakes = 0  # tasks enqueued, for tests and logs

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)

    def run(self) -> None:
        try:
            while not self._stop_event.wait(self.tick):
                try:
                    close_old_connections()
                    self.once()
                except DatabaseError as exc:  # busy or unreachable: the next tick tries again
                    logger.warning("due-time check failed: %s", type(exc).__name__)
        finally:
            connection.close()

    def once(self, now: datetime | None = None) -> int:
        now = now or timezone.now()
        woken = completion_checks_enqueue_due()
        due = delivery_due_at(now)
        if due is not None and due <= now and self._delivery_wake_allowed(now, due):
            async_task(DELIVER_TASK)
            self._delivery_woken_at, self._delivery_woken_for = now, due
            woken += 1
        webhook_due = outbox_due_at(WebhookEvent)
        # Once per due time: a row the task leaves due (the receiver failed) has a later one.
        if webhook_due is not None and webhook_due <= now and webhook_due != self._webhook_woken_for:
            async_task(WEBHOOK_TASK)
            self._webhook_woken_for = webhook_due
            woken += 1
        self.wakes += woken
        return woken

    def _delivery_wake_allowed(self, now: datetime, due: datetime) -> bool:
        """Once per due time: again only if the same row is still unclaimed a while later (workers
        busy, a task lost), and never while the broker already holds a backlog for the workers."""
        woken_at, woken_for = self._delivery_woken_at, self._delivery_woken_for
        if woken_at is not None and woken_for is not None and due <= woken_for and now - woken_at < REPEAT_AFTER:
            return False
        return OrmQ.objects.count() < 4 * int(settings.Q_CLUSTER.get("workers", 1))
