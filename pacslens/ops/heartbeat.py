"""Heartbeats and association counters for long-running processes.

A `HeartbeatThread` stamps a `Heartbeat` row every HEARTBEAT_INTERVAL seconds so `/healthz`
(another process, maybe another host) can tell a live listener or worker cluster from a dead
one, and adds the in-memory counters of this process to `OpsCounter` rows on the same beat.

`AssociationCounter` is bound to the listener's association server (routing.receive.scp): it
counts A-ASSOCIATE-AC and -RJ as they are sent (allow-list, called-AE and association-limit
rejections alike) with no database work on the association's thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable

from django.db import close_old_connections, connection

from routing.models import Heartbeat, OpsCounter
from routing.receive.scp import pdus_refused_take

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 10.0  # seconds between beats; /healthz calls a process down after 3 missed beats
ASSOCIATIONS_COUNTER = "dicom_associations"

# (source, diagnostic) of A-ASSOCIATE-RJ, PS3.8 9.3.4, as metric label values.
REJECT_REASONS: dict[tuple[int, int], str] = {
    (1, 1): "no-reason-given",
    (1, 2): "application-context-not-supported",
    (1, 3): "calling-ae-not-recognised",
    (1, 7): "called-ae-not-recognised",
    (2, 1): "no-reason-given",
    (2, 2): "protocol-version-not-supported",
    (3, 1): "temporary-congestion",
    (3, 2): "local-limit-exceeded",
}


def process_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class AssociationCounter:
    """Counts associations accepted and rejected (by reason) in this process; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Counter[tuple[str, str]] = Counter()

    def bind(self, server) -> None:
        """Bind to a routing.receive.scp.AcceptorServer: every later association reports to us."""
        server.on_associate_answered = self.on_associate_answered
        server.on_connection_refused = self.on_connection_refused

    def on_connection_refused(self, reason: str) -> None:
        with self._lock:
            self._pending[(ASSOCIATIONS_COUNTER, f"refused:{reason}")] += 1

    def on_associate_answered(self, reject: tuple[int, int, int] | None) -> None:
        """None: A-ASSOCIATE-AC sent; else the (result, source, diagnostic) of the A-ASSOCIATE-RJ."""
        if reject is None:
            label = "accepted"
        else:
            label = f"rejected:{REJECT_REASONS.get((reject[1], reject[2]), 'other')}"
        with self._lock:
            self._pending[(ASSOCIATIONS_COUNTER, label)] += 1

    def take(self) -> dict[tuple[str, str], int]:
        """The counts since the last take, with the PDUs the receive path refused (counted on its own threads)."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
        pending.update(pdus_refused_take())
        return dict(pending)

    def put_back(self, deltas: dict[tuple[str, str], int]) -> None:
        with self._lock:
            self._pending.update(deltas)


class HeartbeatThread(threading.Thread):
    """Beats until `stop()`; then forgets its row so a clean shutdown is not reported as a crash."""

    def __init__(
        self,
        *,
        role: str,
        detail: Callable[[], dict] | dict | None = None,
        counter: AssociationCounter | None = None,
        alive: Callable[[], bool] | None = None,
        interval: float = HEARTBEAT_INTERVAL,
    ) -> None:
        super().__init__(name=f"heartbeat-{role}", daemon=True)
        self.role = role
        self.identity = process_identity()
        self._detail = detail
        self.counter = counter
        self._alive = alive or (lambda: True)
        self.interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while True:
                self.beat_once()
                if self._stop_event.wait(self.interval):
                    break
            self.flush()
            Heartbeat.forget(role=self.role, identity=self.identity)
        except Exception:  # the database went away at shutdown: nothing left to report to
            logger.debug("heartbeat %s: final write failed", self.role, exc_info=True)
        finally:
            connection.close()

    def beat_once(self) -> None:
        """One beat (only while `alive()`: a supervisor whose cluster died must look dead)."""
        try:
            close_old_connections()
            if self._alive():
                detail = self._detail() if callable(self._detail) else (self._detail or {})
                Heartbeat.beat(role=self.role, identity=self.identity, detail=detail)
            self.flush()
        except Exception as exc:  # a locked or unreachable database: try again next beat
            logger.warning("heartbeat %s: cannot write (%s); retrying", self.role, type(exc).__name__)
            connection.close()

    def flush(self) -> None:
        if self.counter is None:
            return
        deltas = self.counter.take()
        if not deltas:
            return
        try:
            OpsCounter.add(deltas)
        except Exception:
            self.counter.put_back(deltas)  # counted next time instead of lost
            raise

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)


def tasks_heartbeat() -> None:
    """Scheduled task: proves the cluster's scheduler and a worker actually run tasks."""
    Heartbeat.beat(role="tasks", identity=process_identity())
