"""The DICOM listener: a pynetdicom SCP for C-ECHO and C-STORE.

It does the least work possible per instance (verify, write durably, record, answer); the
handlers here are thin and `routing.store.spool.instance_store` does the work. Study completion
and everything after run in the workers.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pynetdicom.dimse_messages
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import close_old_connections, connection, transaction
from django.utils import timezone
from pydicom import config as pydicom_config
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # pynetdicom creates its SOP classes at run time
from pynetdicom.transport import ThreadedAssociationServer

from routing.models import ApplicationEntity, StoreAssociation
from routing.receive import dicom_tls
from routing.receive.pynetdicom_speedups import pynetdicom_speedups
from routing.store.spool import OUT_OF_RESOURCES, disk_space_low, incoming_dir, instance_store
from routing.tasks import enqueue_completion_check

logger = logging.getLogger(__name__)

# Uncompressed and the common compressed syntaxes; stored exactly as received.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

# A-ASSOCIATE-RJ (result, source, reason) per PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CONGESTION = (0x02, 0x03, 0x01)

# C-STORE failure statuses the handlers answer themselves (PS3.7 C.4.2, PS3.4 B.2.3).
NOT_AUTHORIZED = 0x0124  # the sender is not (or no longer) on the allow-list

ALLOW_LIST_TTL = 5.0  # seconds an allow-list read from the database is reused

# Largest PDU we accept. pynetdicom's default (16 KiB) costs a Python round trip per 16 KiB;
# dcmtk sends up to 128 KiB when allowed. Bounded, so one PDU never costs much memory.
MAXIMUM_PDU_SIZE = 1024 * 1024

# Processes sharing one listening socket: a process already serving associations waits this long
# per association (at most ACCEPT_DEFER_MAX) before accepting, so that an idle process gets there
# first. Milliseconds, against the tens it takes to set up an association.
ACCEPT_DEFER = 0.002
ACCEPT_DEFER_MAX = 0.010
ACCEPT_RECENT = 0.020


class ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's server plus SO_REUSEPORT (several in-thread listeners can share one port),
    TCP_NODELAY on accepted sockets (without it, a Nagle-enabled sender waits ~40 ms for a
    delayed ACK on every response) and the TLS handshake in the association's thread.

    With `listening_socket` it accepts on a socket bound elsewhere (the supervisor of
    `manage.py dicom_listener`, before forking) instead of binding its own: every process then
    takes the next connection when it is free, where SO_REUSEPORT hashes connections to
    processes whatever their load (measured: 4 associations spread 3:1 over 2 processes).
    """

    # The kernel's queue of connections not yet accepted (socketserver's default is 5: a burst of
    # connections would have the kernel drop SYNs and a real sender wait for a retransmit).
    request_queue_size = 128

    def __init__(self, *args, listening_socket: socket.socket | None = None, **kwargs) -> None:
        self._listening_socket = listening_socket
        self._recent_accepts: collections.deque[float] = collections.deque()
        # Open connections (each costs two threads until it closes) by peer address; bounded below.
        self.max_connections_per_peer: int | None = None
        self.max_connections: int | None = None
        self.on_connection_refused: Callable[[str], None] | None = None  # told the refusal reason
        self._open_connections: dict[str, list[socket.socket]] = {}
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self._listening_socket is not None:
            assert self.socket is not None  # TCPServer made it before calling server_bind
            self.socket.close()  # the one TCPServer made for us
            self.socket = self._listening_socket
            self.server_address = self.socket.getsockname()
            return
        assert self.socket is not None  # TCPServer made it before calling server_bind
        if hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def server_activate(self) -> None:
        if self._listening_socket is None:
            super().server_activate()

    def server_close(self) -> None:
        if self._listening_socket is not None:
            # No shutdown(): on a socket shared with other processes it stops them accepting too.
            assert self.socket is not None  # server_bind set it
            self.socket.close()
            return
        super().server_close()

    def get_request(self):
        # A shared listening socket is non-blocking (another process may take the connection
        # first: accept() then raises BlockingIOError, which socketserver ignores).
        if self._listening_socket is not None:
            self._accept_defer()
        assert self.socket is not None  # bound (or handed to us) at construction
        client_socket, address = self.socket.accept()
        if self._listening_socket is not None:
            self._recent_accepts.append(time.monotonic())
        client_socket.setblocking(True)
        client_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            # pynetdicom handshakes here, in the accepting thread: one peer that connects and
            # sends nothing would stop every other connection. process_request_thread does it.
            client_socket = self.ssl_context.wrap_socket(client_socket, server_side=True, do_handshake_on_connect=False)
        return client_socket, address

    def _accept_defer(self) -> None:
        """Every process wakes for a new connection; a busy one waits a little so an idle one takes it.

        Busy: associations running, plus connections accepted in the last ACCEPT_RECENT seconds
        (an association's thread starts a moment after its accept).
        """
        now = time.monotonic()
        recent = self._recent_accepts
        while recent and now - recent[0] > ACCEPT_RECENT:
            recent.popleft()
        busy = len(self.active_associations) + len(recent)
        if busy:
            time.sleep(min(ACCEPT_DEFER * busy, ACCEPT_DEFER_MAX))

    def process_request(self, request, client_address) -> None:
        """Start the connection's thread, unless its peer (or everyone) already has too many open:
        then close it at once, costing no thread. A sender treats that like a busy network and retries."""
        refusal = self._connection_refusal(request, client_address[0])
        if refusal is None:
            super().process_request(request, client_address)
            return
        logger.warning("refusing connection from %s: %s", client_address[0], refusal)
        self.shutdown_request(request)
        if self.on_connection_refused is not None:
            self.on_connection_refused(refusal)

    def _connection_refusal(self, request: socket.socket, peer: str) -> str | None:
        """Why a new connection from `peer` is refused, or None after counting it as open."""
        # Closed sockets (association ended, handshake failed, ARTIM expired) leave the count here,
        # on the accepting thread, so no association path has to remember to decrement.
        for address in list(self._open_connections):
            still_open = [sock for sock in self._open_connections[address] if sock.fileno() != -1]
            if still_open:
                self._open_connections[address] = still_open
            else:
                del self._open_connections[address]
        from_peer = self._open_connections.setdefault(peer, [])
        if self.max_connections_per_peer is not None and len(from_peer) >= self.max_connections_per_peer:
            return "peer-connection-limit"
        total = sum(len(each) for each in self._open_connections.values())
        if self.max_connections is not None and total >= self.max_connections:
            return "connection-limit"
        from_peer.append(request)
        return None

    def process_request_thread(self, request, client_address) -> None:
        if isinstance(request, ssl.SSLSocket) and not _tls_handshake(request, client_address, self.ae.acse_timeout):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


def _tls_handshake(request: ssl.SSLSocket, client_address, timeout: float | None) -> bool:
    """The server side of the TLS handshake, bounded by the ACSE timeout; False (logged) when it fails."""
    try:
        request.settimeout(timeout)
        request.do_handshake()
        request.settimeout(None)
        return True
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        reason = getattr(exc, "reason", None) or type(exc).__name__
        logger.warning("refusing TLS connection from %s: %s", client_address[0], reason)
        return False


class DicomListener:
    """One listening AE on one or two ports. `start()` returns at once; `stop()` drains running associations.

    `tls_mode` (default PACSLENS_DICOM_TLS_MODE): "off", plain DICOM on `port`; "tls", TLS only
    on `port`; "both", plain on `port` and TLS on `tls_port`. `listening_sockets`, when given,
    are already bound and listening, one per port in that order (see ReusePortServer).
    """

    def __init__(
        self,
        *,
        host: str | None = None,
        port: int | None = None,
        ae_title: str | None = None,
        tls_mode: str | None = None,
        tls_port: int | None = None,
        listening_sockets: list[socket.socket] | None = None,
    ) -> None:
        self.host = host if host is not None else settings.DICOM_HOST
        self.port = port if port is not None else settings.DICOM_PORT
        self.ae_title = ae_title or settings.AE_TITLE
        self.tls_mode = tls_mode or settings.DICOM_TLS_MODE
        self.tls_port: int | None = tls_port if tls_port is not None else settings.DICOM_TLS_PORT
        self.listening_sockets = listening_sockets
        self.server: ReusePortServer | None = None  # the server on `port`
        self.servers: list[ReusePortServer] = []
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self._allow_list: dict[str, ApplicationEntity] = {}
        self._allow_list_read_at = 0.0
        self._host_addresses: dict[str, frozenset[str]] = {}
        self._lock = threading.Lock()
        self.speedups = False  # whether our pynetdicom receive path (and its PDU limits) is installed

    def endpoints(self) -> list[tuple[int, bool]]:
        """(port, uses TLS) for each port this listener serves."""
        return listener_endpoints(self.tls_mode, self.port, self.tls_port)

    def start(self) -> ReusePortServer:
        # Receive straight to a temporary file under the data dir: bounded memory for huge
        # instances, and the final rename stays on one filesystem.
        _config.STORE_RECV_CHUNKED_DATASET = True
        # Only pynetdicom's receive files go there: setting tempfile.tempdir instead redirected
        # every temporary file of the process (in tests, into another test's deleted data dir).
        pynetdicom.dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[assignment]  # a NamedTemporaryFile with our dir
            tempfile.NamedTemporaryFile, dir=str(incoming_dir())
        )
        # Identifiers (patient names and IDs) must never reach our logs.
        _config.LOG_HANDLER_LEVEL = "none"
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        # pydicom re-validates every value pynetdicom sets on its command datasets; we check the
        # UIDs that matter ourselves (routing.store), so skip the cost and the warnings.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE

        self.speedups = settings.DICOM_SPEEDUPS and pynetdicom_speedups(MAXIMUM_PDU_SIZE)
        logger.info("pynetdicom %s receive speed-ups %s", pynetdicom.__version__, "on" if self.speedups else "OFF")
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
        ae.maximum_associations = settings.DICOM_MAX_ASSOCIATIONS
        ae.acse_timeout = settings.DICOM_ACSE_TIMEOUT
        ae.dimse_timeout = settings.DICOM_DIMSE_TIMEOUT
        ae.network_timeout = settings.DICOM_NETWORK_TIMEOUT
        ae.require_called_aet = True
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:  # always set on pynetdicom's storage contexts
                ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        handlers: list[EventHandlerType] = [
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_RELEASED, self.handle_ended, [True]),
            (evt.EVT_ABORTED, self.handle_ended, [False]),
            (evt.EVT_CONN_CLOSE, self.handle_ended, [False]),
        ]
        tls_context = dicom_tls.server_context() if self.tls_mode != "off" else None
        for index, (port, uses_tls) in enumerate(self.endpoints()):
            server = cast(  # make_server returns an instance of server_class
                ReusePortServer,
                ae.make_server(
                    (self.host, port),
                    evt_handlers=handlers,
                    server_class=ReusePortServer,
                    ssl_context=tls_context if uses_tls else None,
                    listening_socket=self.listening_sockets[index] if self.listening_sockets else None,
                ),
            )
            ae._servers.append(server)  # as AE.start_server does; server.shutdown() removes it
            server.max_connections_per_peer = settings.DICOM_MAX_ASSOCIATIONS_PER_PEER
            server.max_connections = settings.DICOM_MAX_CONNECTIONS
            self.servers.append(server)
            name = "dicom-listener-tls" if uses_tls else "dicom-listener"
            threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
            logger.info(
                "DICOM listener %s on %s:%s%s (%s)",
                self.ae_title,
                self.host,
                server.server_address[1],
                " (TLS)" if uses_tls else "",
                self.identity,
            )
        self.server = self.servers[0]
        self.port = self.server.server_address[1]
        if self.tls_mode == "tls":
            self.tls_port = self.port
        elif self.tls_mode == "both":
            self.tls_port = self.servers[1].server_address[1]
        return self.server

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let running associations finish for up to `grace` seconds, then abort the rest."""
        if not self.servers:
            return
        grace = settings.DICOM_SHUTDOWN_GRACE if grace is None else grace
        servers, self.servers, self.server = self.servers, [], None
        for server in servers:
            server.shutdown()  # stops accepting new connections and closes the listening socket
        deadline = time.monotonic() + grace
        while any(server.active_associations for server in servers) and time.monotonic() < deadline:
            time.sleep(0.1)
        for server in servers:
            for assoc in server.active_associations:
                assoc.abort()

    # --- handlers: thin, the work lives in routing.store -------------------------------------

    def handle_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        # requestor.ae_title is filled only after negotiation; the A-ASSOCIATE-RQ has it now.
        primitive = assoc.requestor.primitive
        assert primitive is not None  # EVT_REQUESTED fires on the A-ASSOCIATE-RQ
        calling = str(primitive.calling_ae_title).strip()
        try:
            reject, reason = self._association_refusal(calling, assoc)
        except Exception as exc:
            # pynetdicom logs an exception raised here and accepts the association anyway: fail
            # closed, and transiently, so the sender retries once the database answers again.
            reject, reason = REJECT_CONGESTION, f"allow-list check failed ({type(exc).__name__})"
        if reject:
            logger.warning("rejecting association from %s (%s): %s", calling, assoc.requestor.address, reason)
            assoc.acse.send_reject(*reject)
            assoc.kill()

    def _association_refusal(self, calling: str, assoc) -> tuple[tuple[int, int, int] | None, str]:
        """(A-ASSOCIATE-RJ, why) for an association we refuse, (None, "") for one we accept."""
        if disk_space_low():
            return REJECT_CONGESTION, "free disk space below the floor"
        sender = self._allowed_sender(calling, assoc.requestor.address)
        if sender is None and not settings.DICOM_ACCEPT_ANY_CALLING_AE:
            return REJECT_CALLING_AE, "calling AE title not recognised"
        if sender is not None and not sender.certificate_accepted(_peer_certificate_names(assoc)):
            return REJECT_CALLING_AE, "no client certificate carrying the name bound to this calling AE title"
        return None, ""

    def handle_echo(self, event: evt.Event) -> int:
        return 0x0000

    def handle_store(self, event: evt.Event) -> int | tuple:
        request = cast(C_STORE, event.request)  # EVT_C_STORE carries the C-STORE request
        assoc = event.assoc
        calling = assoc.requestor.ae_title.strip()
        try:
            sender = self._allowed_sender(calling, assoc.requestor.address)
            association_id = self._association_row(assoc)
        except Exception as exc:  # a locked or unreachable database: the sender should retry later
            logger.warning("refusing C-STORE from %s: database unavailable (%s)", calling, type(exc).__name__)
            Path(event.dataset_path).unlink(missing_ok=True)
            return OUT_OF_RESOURCES
        if sender is None and not settings.DICOM_ACCEPT_ANY_CALLING_AE:
            # The allow-list changed since the association was accepted (or its check failed then).
            Path(event.dataset_path).unlink(missing_ok=True)
            return NOT_AUTHORIZED
        result = instance_store(
            temp_path=Path(event.dataset_path),
            request_sop_class_uid=str(request.AffectedSOPClassUID),
            request_sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_ae_title=calling,
            called_ae_title=assoc.acceptor.ae_title.strip(),
            association_id=association_id,
            sender_id=sender.pk if sender else None,
        )
        if result.ok:
            assoc._pacslens_count = getattr(assoc, "_pacslens_count", 0) + 1  # type: ignore[attr-defined]  # our counter on pynetdicom's object
            return 0x0000
        return result.status

    def handle_ended(self, event: evt.Event, released: bool) -> None:
        """Close the association's row and ask the workers to check its studies for completion."""
        assoc = event.assoc
        _partial_receive_remove(assoc)
        association_id = getattr(assoc, "_pacslens_association_id", None)
        released = released or getattr(assoc, "_pacslens_releasing", False)
        try:
            if association_id is None:
                return
            assoc._pacslens_association_id = None  # type: ignore[attr-defined]  # ours; release and connection close both fire
            with transaction.atomic():
                StoreAssociation.objects.filter(pk=association_id, ended_at=None).update(
                    ended_at=timezone.now(),
                    released_normally=released,
                    instances_received=getattr(assoc, "_pacslens_count", 0),
                )
                enqueue_completion_check(association_id)
        finally:
            connection.close()  # each association runs in its own thread with its own connection

    # --- helpers -------------------------------------------------------------------------------

    def _association_row(self, assoc) -> int:
        association_id = getattr(assoc, "_pacslens_association_id", None)
        if association_id is None:
            close_old_connections()
            row = StoreAssociation.objects.create(
                calling_ae_title=assoc.requestor.ae_title.strip(),
                called_ae_title=assoc.acceptor.ae_title.strip(),
                peer_address=str(assoc.requestor.address),
                listener=self.identity,
            )
            association_id = assoc._pacslens_association_id = row.pk
        return association_id

    def _allowed_sender(self, calling: str, address: str) -> ApplicationEntity | None:
        with self._lock:
            if time.monotonic() - self._allow_list_read_at > ALLOW_LIST_TTL:
                close_old_connections()
                self._allow_list = {
                    ae.ae_title: ae for ae in ApplicationEntity.objects.filter(enabled=True, may_send=True)
                }
                self._host_addresses = {}  # names are looked up again with the list (DNS may have moved)
                self._allow_list_read_at = time.monotonic()
            sender = self._allow_list.get(calling)
            if sender and sender.check_peer_ip:
                # Every C-STORE asks again (the list may have changed); the name's addresses are
                # resolved once per list read, not once per instance.
                addresses = self._host_addresses.get(sender.host)
                if addresses is None:
                    addresses = self._host_addresses[sender.host] = _host_addresses(sender.host)
                if address not in addresses:
                    return None
        return sender

    def refresh_allow_list(self) -> None:
        self._allow_list_read_at = 0.0


def _peer_certificate_names(assoc) -> set[str]:
    """Names in the peer's verified TLS client certificate; none on a plain connection."""
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if not isinstance(sock, ssl.SSLSocket):
        return set()
    return dicom_tls.certificate_names(sock.getpeercert())


def _partial_receive_remove(assoc) -> None:
    """Remove the temporary file of a C-STORE cut off mid-transfer by an abort or a dropped connection.

    pynetdicom writes the dataset to it as fragments arrive and forgets it when the association
    ends first; a complete message is handed to handle_store (and its file removed) instead.
    """
    message = getattr(assoc.dimse, "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return
    # The receive speed-ups keep the path beside the file; stock pynetdicom's temporary file has a name.
    path = getattr(message, "_data_set_path", None) or getattr(partial, "name", None)
    try:
        partial.close()
        if isinstance(path, str | Path):
            Path(path).unlink(missing_ok=True)
    except OSError:  # the schedule's incoming sweep gets it later
        logger.debug("cannot remove a partial receive file", exc_info=True)


def _host_addresses(configured: str) -> frozenset[str]:
    """The addresses a configured host name (or address) stands for; none when it does not resolve."""
    try:
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(configured, None))
    except OSError:
        return frozenset()


def listener_endpoints(tls_mode: str, port: int, tls_port: int | None) -> list[tuple[int, bool]]:
    """(port, uses TLS) per listening port for a PACSLENS_DICOM_TLS_MODE."""
    if tls_mode == "off":
        return [(port, False)]
    if tls_mode == "tls":
        return [(port, True)]
    if tls_mode == "both":
        if tls_port is None:
            raise ImproperlyConfigured("PACSLENS_DICOM_TLS_MODE=both needs PACSLENS_DICOM_TLS_PORT")
        return [(port, False), (tls_port, True)]
    raise ImproperlyConfigured(f"DICOM TLS mode {tls_mode!r} is not one of off, tls, both")
