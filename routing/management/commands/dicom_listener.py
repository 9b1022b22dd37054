"""`manage.py dicom_listener`: the C-ECHO / C-STORE SCP, run forever under a supervisor.

pynetdicom runs every association of a process under one GIL, so for throughput we start
PACSLENS_DICOM_LISTENER_PROCESSES processes that share the port with SO_REUSEPORT and let
the kernel spread connections between them. SIGTERM/SIGINT: stop accepting, let running
associations finish (bounded by PACSLENS_DICOM_SHUTDOWN_GRACE), exit 0.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import connections

from routing.heartbeat import AssociationCounter, HeartbeatThread
from routing.ingest import incoming_dir
from routing.listener import DicomListener
from routing.models import HeartbeatRole

STALE_TEMP_SECONDS = 24 * 3600


class Command(BaseCommand):
    help = "Run the DICOM listener (C-ECHO, C-STORE SCP)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--port", type=int, default=None, help="Override PACSLENS_DICOM_PORT")
        parser.add_argument("--processes", type=int, default=None, help="Override PACSLENS_DICOM_LISTENER_PROCESSES")

    def handle(self, *args, port: int | None = None, processes: int | None = None, **options) -> None:
        self.shutdown = False
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        port = port or settings.DICOM_PORT
        processes = processes or settings.DICOM_LISTENER_PROCESSES
        remove_stale_temp_files(incoming_dir())
        self.stdout.write(
            f"DICOM listener {settings.AE_TITLE} on {settings.DICOM_HOST}:{port}, {processes} process(es)"
        )
        if processes == 1:
            self.serve(port)
        else:
            self.supervise(port, processes)

    def on_signal(self, signum, frame) -> None:
        self.shutdown = True

    def serve(self, port: int) -> None:
        listener = DicomListener(port=port)
        server = listener.start()
        # Heartbeat and association counts for /healthz and /metrics (web process, maybe another host).
        counter = AssociationCounter()
        counter.bind(server)
        heartbeat = HeartbeatThread(
            role=HeartbeatRole.LISTENER,
            counter=counter,
            detail=lambda: {
                "ae_title": listener.ae_title,
                "port": listener.port,
                "active_associations": len(server.active_associations),
            },
        )
        heartbeat.start()
        while not self.shutdown:
            time.sleep(0.2)
        listener.stop()
        heartbeat.stop()

    def supervise(self, port: int, processes: int) -> None:
        """Fork `processes` listeners and restart any that dies; forward SIGTERM to all."""
        connections.close_all()  # never share a database connection across fork
        children: dict[int, int] = {}
        for slot in range(processes):
            children[self.spawn(port)] = slot
        while not self.shutdown:
            time.sleep(0.2)
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid and not self.shutdown:
                self.stderr.write(f"listener process {pid} exited ({status}); restarting it")
                children.pop(pid, None)
                children[self.spawn(port)] = 0
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass

    def spawn(self, port: int) -> int:
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                self.shutdown = False
                self.serve(port)
            except BaseException:
                code = 1
                raise
            finally:
                os._exit(code)
        return pid


def remove_stale_temp_files(folder: Path) -> None:
    """Temporary files of associations cut off by a crash; never visible as instances."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for path in folder.iterdir():
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass
