"""`manage.py dicom_listener`: the C-ECHO / C-STORE SCP, run forever under a supervisor.

Every association of a process runs under one GIL, so for throughput we start
PACSLENS_DICOM_LISTENER_PROCESSES processes. The supervisor binds the listening socket(s) (plain,
TLS, or both: PACSLENS_DICOM_TLS_MODE) before forking and every process accepts on them, so a
connection goes to whichever process is free to accept it; with SO_REUSEPORT the kernel hashed
connections to processes whatever their load. SIGTERM/SIGINT: stop accepting, let running
associations finish (bounded by PACSLENS_DICOM_SHUTDOWN_GRACE), exit 0.

Memory (docs/operations.md, "Listener memory"): the supervisor has imported everything the children
use before it forks, and freezes the garbage collector's view of those objects, so the children
share its pages instead of copying them; the listener skips the URL checks, which would import the
staff UI, the API and the delivery and inference code it never runs.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import time

from django.conf import settings
from django.core.checks import Tags
from django.core.checks.registry import registry
from django.core.management.base import BaseCommand
from django.db import DatabaseError, connections

from pacslens.ops.heartbeat import AssociationCounter, HeartbeatThread
from routing.completion import associations_close_for
from routing.models import HeartbeatRole
from routing.receive import dicom_tls
from routing.receive.listener import DicomListener, listener_endpoints
from routing.store.spool import incoming_sweep

LISTEN_BACKLOG = 128  # connections the kernel queues while every process is busy


class Command(BaseCommand):
    help = "Run the DICOM listener (C-ECHO, C-STORE SCP)."
    # Every system check but the URL ones: those import the URLconf, that is the staff UI, the API
    # and the delivery and inference code (onnxruntime, highdicom, ...), ~55 MiB in every listener
    # process, which never serves HTTP. The web process and `manage.py check` still run them.
    requires_system_checks = sorted(registry.tags_available() - {Tags.urls})

    def add_arguments(self, parser) -> None:
        parser.add_argument("--port", type=int, default=None, help="Override PACSLENS_DICOM_PORT")
        parser.add_argument("--processes", type=int, default=None, help="Override PACSLENS_DICOM_LISTENER_PROCESSES")

    def handle(self, *args, port: int | None = None, processes: int | None = None, **options) -> None:
        self.shutdown = False
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        port = port or settings.DICOM_PORT
        processes = processes or settings.DICOM_LISTENER_PROCESSES
        incoming_sweep()  # older than an hour; the schedule sweeps while we run
        endpoints = listener_endpoints(settings.DICOM_TLS_MODE, port, settings.DICOM_TLS_PORT)
        if settings.DICOM_TLS_MODE != "off":
            dicom_tls.server_context()  # a bad certificate or key fails here, not in every child
        ports = ", ".join(f"{number}{' (TLS)' if uses_tls else ''}" for number, uses_tls in endpoints)
        self.stdout.write(
            f"DICOM listener {settings.AE_TITLE} on {settings.DICOM_HOST}:{ports}, {processes} process(es)"
        )
        if processes == 1:
            self.serve(port)
            return
        sockets = [listening_socket_bind(settings.DICOM_HOST, number) for number, _ in endpoints]
        try:
            self.supervise(port, processes, sockets)
        finally:
            for sock in sockets:
                sock.close()

    def on_signal(self, signum, frame) -> None:
        self.shutdown = True

    def serve(self, port: int, sockets: list[socket.socket] | None = None) -> None:
        listener = DicomListener(port=port, listening_sockets=sockets)
        listener.start()
        # Heartbeat and association counts for /healthz and /metrics (web process, maybe another host).
        counter = AssociationCounter()
        for each in listener.servers:
            counter.bind(each)
        heartbeat = HeartbeatThread(
            role=HeartbeatRole.LISTENER,
            counter=counter,
            detail=lambda: {
                "ae_title": listener.ae_title,
                "port": listener.port,
                "tls_port": listener.tls_port if listener.tls_mode != "off" else None,
                "active_associations": sum(len(each.active_associations) for each in listener.servers),
            },
        )
        heartbeat.start()
        while not self.shutdown:
            time.sleep(0.2)
        listener.stop()
        heartbeat.stop()

    def associations_of_dead_child_close(self, pid: int) -> None:
        """Its open associations will never end by themselves: close them now (as aborted), so the
        studies they delivered are not held back until the sweep notices the missing heartbeat."""
        try:
            associations_close_for(listener=f"{socket.gethostname()}:{pid}")
        except DatabaseError as exc:  # the sweep closes them later (routing.completion.associations_orphaned_close)
            self.stderr.write(f"cannot close the associations of listener process {pid}: {type(exc).__name__}")
        finally:
            connections.close_all()  # the supervisor forks again later: it must hold no connection

    def supervise(self, port: int, processes: int, sockets: list[socket.socket]) -> None:
        """Fork `processes` listeners on the bound `sockets` and restart any that dies; forward SIGTERM to all."""
        connections.close_all()  # never share a database connection across fork
        children: dict[int, int] = {}
        for slot in range(processes):
            children[self.spawn(port, sockets)] = slot
        while not self.shutdown:
            time.sleep(0.2)
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid and not self.shutdown:
                self.stderr.write(f"listener process {pid} exited ({status}); restarting it")
                children.pop(pid, None)
                children[self.spawn(port, sockets)] = 0
                self.associations_of_dead_child_close(pid)
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

    def spawn(self, port: int, sockets: list[socket.socket]) -> int:
        # Objects the supervisor made (modules, classes, settings) move to a generation the
        # collector never visits: a child's collections would otherwise write to every one of
        # them and so copy the pages it shares with the supervisor (measured with two processes:
        # 4-5 MiB more PSS in all, idle or after receiving).
        gc.freeze()
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                self.shutdown = False
                self.serve(port, sockets)
            except BaseException:
                code = 1
                raise
            finally:
                os._exit(code)
        return pid


def listening_socket_bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket for the listener processes to share.

    Non-blocking: when several processes wake for one connection, those that lose the race
    get BlockingIOError from accept() (socketserver ignores it) instead of blocking in it.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
