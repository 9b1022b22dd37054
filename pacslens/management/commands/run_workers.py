"""`manage.py run_workers`: the django-q2 cluster, supervised properly.

django-q2's own `qcluster` returns from its command right after starting the sentinel and
lets multiprocessing's exit hook wait for it; a SIGTERM in that state kills the parent at
once and orphans the sentinel and its workers (seen here). This command keeps the parent in
a loop, turns SIGTERM/SIGINT into an orderly `Cluster.stop()` and exits 0.
"""

from __future__ import annotations

import signal
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand
from django_q.cluster import Cluster

from pacslens.ops.due_wake import DueWakeThread
from pacslens.ops.heartbeat import HeartbeatThread
from pacslens.ops.schedules import schedules_ensure
from routing.models import HeartbeatRole


class Command(BaseCommand):
    help = "Run the django-q2 worker cluster (inference, delivery, polling, sweeps)."

    def handle(self, *args, **options) -> None:
        self.shutdown = False
        schedules_ensure()
        cluster = Cluster()
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        cluster.start()
        # Beats only while the sentinel lives, so /healthz sees a dead cluster within ~30 s.
        heartbeat = HeartbeatThread(
            role=HeartbeatRole.WORKERS,
            alive=lambda: cluster.sentinel.is_alive(),
            detail={"workers": cluster_workers()},
        )
        heartbeat.start()
        # Due retries and release graces start on time, not at the scheduler's next ~30 s look.
        due_wake = DueWakeThread()
        due_wake.start()
        while not self.shutdown:
            time.sleep(0.5)
            if self.shutdown:
                break  # a process-group signal may have stopped the sentinel already
            if not cluster.sentinel.is_alive():
                self.stderr.write("worker cluster died; exiting so the supervisor restarts it")
                sys.exit(1)
        due_wake.stop()
        heartbeat.stop()
        if cluster.sentinel.is_alive():
            cluster.stop()

    def on_signal(self, signum, frame) -> None:
        self.shutdown = True


def cluster_workers() -> int:
    return int(settings.Q_CLUSTER.get("workers", 1))
