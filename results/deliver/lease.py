"""A claimed delivery's lease: how long it is, and keeping it ahead of the clock while the send runs.

A worker claims a row by setting `lease_until`; another worker may take the row over only once
the lease has passed (the first one is presumed dead). The first lease covers the send's longest
honest duration (every request it makes, each allowed its timeout twice) plus a margin; while
the send runs, a thread moves the lease forward every third of its length, so a send slowed
further (a token refresh and its retry, a slow DNS) is never taken over while its worker lives.
A killed worker stops renewing, and its row is taken over one lease later, as before.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from types import TracebackType

from django.db import DatabaseError, connection
from django.utils import timezone

from results.models import Delivery, DeliveryState, Destination

logger = logging.getLogger(__name__)

LEASE_EXTRA_SECONDS = 30.0  # added to a send's longest honest duration: the lease outlives the attempt


def lease_duration(destination: Destination) -> timedelta:
    return timedelta(seconds=destination.send_seconds_max() + LEASE_EXTRA_SECONDS)


class LeaseRenewal:
    """While the `with` block runs, keep `delivery`'s lease (held by `worker`) one lease ahead."""

    def __init__(self, delivery: Delivery, worker: str) -> None:
        self.delivery_pk = delivery.pk
        self.worker = worker
        self.lease = lease_duration(delivery.destination)
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{delivery.pk}", daemon=True)

    def __enter__(self) -> LeaseRenewal:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.lease.total_seconds() / 3):
                try:
                    renewed = Delivery.objects.filter(
                        pk=self.delivery_pk, state=DeliveryState.IN_FLIGHT, lease_owner=self.worker
                    ).update(lease_until=timezone.now() + self.lease)
                except DatabaseError as exc:  # busy or unreachable: the next tick tries again
                    logger.warning("delivery %s: cannot renew its lease (%s)", self.delivery_pk, type(exc).__name__)
                    continue
                if renewed != 1:
                    logger.warning("delivery %s: lease lost while sending", self.delivery_pk)
                    return
                self.renewals += 1
        finally:
            connection.close()  # this thread's own connection
