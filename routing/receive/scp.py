"""Our own DICOM acceptor: the upper layer (PS3.8) and the two DIMSE services the listener offers
(C-ECHO and C-STORE, PS3.7), one thread per association, reading the socket itself.

Why our own: pynetdicom's acceptor runs two threads per association that poll queues and
sleep 1 ms when idle, reads 4 KiB per recv(), builds pydicom datasets to decode and answer each
command, and reads a whole PDU into memory before it looks at the length a peer claims. We
patched its private methods for speed and safety (`pynetdicom_speedups`, pynetdicom 3.0.4 only);
an upgrade could silently lose both. This module depends only on pynetdicom's public pieces: the
A-ASSOCIATE-RQ/-AC PDU classes and `negotiate_as_acceptor` (the long tail of association
negotiation: presentation contexts, role selection, user information items). Everything per
instance (PDV parsing, command sets, responses, file meta) is a few struct calls here.

How a C-STORE is received: the command fragments are collected (at most MAXIMUM_COMMAND bytes);
the data set fragments are written to a temporary file under DATA_DIR/incoming as they arrive,
after a File Meta header; the socket is read into one reused buffer of READ_CHUNK bytes, so what
a peer *claims* never decides what we allocate. The last fragment hands the closed file to
`StoreHandler.store` (routing.store.spool.instance_store: durable, recorded) and only then is the
C-STORE-RSP sent. A PDU longer than we announced, an unknown PDU, a malformed item or command,
and a data set without its command abort the association and remove any partial file.

Operations are performed one at a time in the order received (an Asynchronous Operations Window
request is answered 1/1, PS3.7 D.3.3.3).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import socket
import socketserver
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor

logger = logging.getLogger(__name__)

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)

# Limits on what a peer can make us read or hold (PS3.8 9.3). A P-DATA-TF may be as long as the
# maximum PDU we announced; the margin forgives peers that count a header in it.
PDU_MARGIN = 1024
MAXIMUM_ASSOCIATE_RQ = 64 * 1024  # 128 presentation contexts with long UIDs take about 20 KiB
OTHER_PDU_MAXIMUM = 64 * 1024  # release and abort PDUs are 4 bytes long; AC/RJ never come to us
MAXIMUM_COMMAND = 64 * 1024  # a C-STORE-RQ command set is a few hundred bytes
READ_CHUNK = 256 * 1024  # one buffer per association, allocated at its first data set

# A-ABORT reasons, source "service provider" (PS3.8 9.3.8)
ABORT_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNISED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06
SOURCE_USER, SOURCE_PROVIDER = 0x00, 0x02

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
REJECT_PROTOCOL_VERSION = (0x02, 0x02, 0x02)

# DIMSE command fields and statuses (PS3.7 9.3, 9.1, C)
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATA_SET = 0x0101
SOP_CLASS_NOT_SUPPORTED = 0x0122
UNRECOGNISED_OPERATION = 0x0211
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700

PDUS_REFUSED_COUNTER = "dicom_pdus_refused"  # OpsCounter name, label: the reason
_refused: collections.Counter[tuple[str, str]] = collections.Counter()
_refused_lock = threading.Lock()


def pdus_refused_take() -> dict[tuple[str, str], int]:
    """PDUs refused since the last call, as OpsCounter deltas ((PDUS_REFUSED_COUNTER, reason) → count)."""
    with _refused_lock:
        taken = dict(_refused)
        _refused.clear()
    return taken


class ProtocolError(Exception):
    """The peer broke the protocol: abort the association with `reason`."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER, counted_as: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.counted_as = counted_as


class PeerGone(Exception):
    """The connection closed."""


class NetworkTimeout(Exception):
    """Nothing arrived within the ACSE timeout (before acceptance) or the network timeout (after)."""


@dataclass
class StoreRequest:
    """A C-STORE-RQ as the handler sees it: the command's fields and the received data set's file."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    abstract_syntax: str
    path: Path
    move_originator_ae_title: str = ""


@dataclass(eq=False)  # identity: kept in a set of running associations
class Association:
    """One accepted connection; what handlers may read and keep per association."""

    peer_address: str
    peer_port: int
    sock: socket.socket
    calling_ae_title: str = ""
    called_ae_title: str = ""
    established: bool = False
    released: bool = False
    instances_received: int = 0
    accepted_contexts: dict[int, tuple[str, str]] = field(default_factory=dict)  # id → (abstract, transfer)
    state: dict = field(default_factory=dict)  # the handler's own per-association values

    def peer_certificate(self) -> dict | None:
        """The verified TLS client certificate (ssl's dict), None on a plain connection."""
        if isinstance(self.sock, ssl.SSLSocket):
            return self.sock.getpeercert()
        return None


class StoreHandler(Protocol):
    def association_requested(self, assoc: Association) -> tuple[tuple[int, int, int], str] | None:
        """(A-ASSOCIATE-RJ result/source/reason, why) to refuse, None to accept."""

    def store(self, assoc: Association, request: StoreRequest) -> tuple[int, str]:
        """(status, error comment) for a received instance; must consume `request.path`."""

    def association_ended(self, assoc: Association) -> None:
        """Called once per connection that reached its thread, however it ended (`assoc.established`:
        whether it was accepted). On the connection's thread: release what the thread holds."""


@dataclass
class AcceptorSettings:
    ae_title: str
    maximum_pdu_size: int
    acse_timeout: float | None  # until the A-ASSOCIATE-RQ has arrived (and the TLS handshake)
    network_timeout: float | None  # between DIMSE messages
    dimse_timeout: float | None  # within one: from a C-STORE-RQ's command to its data set's last byte
    incoming_dir: Callable[[], Path]
    supported: list[PresentationContext]


def supported_contexts(storage_classes: list[str], transfer_syntaxes: list[str]) -> list[PresentationContext]:
    """Verification (pynetdicom's default transfer syntaxes) and every storage class with `transfer_syntaxes`.

    The requestor may be their SCU, never their SCP (we send no requests): a role selection item is
    answered so, and a context whose requestor would only be its SCP is rejected (PS3.7 D.3.3.4).
    """
    contexts = [build_context(VERIFICATION), *(build_context(uid, transfer_syntaxes) for uid in storage_classes)]
    for context in contexts:
        context.scu_role, context.scp_role = True, False
    return contexts


class AcceptorServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Accepts connections and runs each as an `Association` on its own daemon thread.

    `listening_socket`: accept on a socket bound elsewhere (the supervisor of `manage.py
    dicom_listener`, before forking) instead of binding one; every process then takes the next
    connection when it is free to (SO_REUSEPORT hashed connections to processes whatever their
    load: measured, 4 associations spread 3:1 over 2 processes). Connections per peer address and in total are bounded before
    any thread starts; TLS handshakes run on the connection's thread, bounded by the ACSE timeout.
    """

    daemon_threads = True
    allow_reuse_address = True
    # The kernel's queue of connections not yet accepted (socketserver's default is 5: a burst of
    # connections would have the kernel drop SYNs and a real sender wait for a retransmit).
    request_queue_size = 128
    # A process already serving associations waits this long per association (at most
    # ACCEPT_DEFER_MAX) before accepting on a shared socket, so that an idle process gets there first.
    accept_defer = 0.002
    accept_defer_max = 0.010
    accept_recent = 0.020

    def __init__(
        self,
        address: tuple[str, int],
        *,
        settings: AcceptorSettings,
        handler: StoreHandler,
        shared: AssociationSlots,
        ssl_context: ssl.SSLContext | None = None,
        listening_socket: socket.socket | None = None,
    ) -> None:
        self.acceptor = settings
        self.handler = handler
        self.slots = shared
        self.ssl_context = ssl_context
        self._listening_socket = listening_socket
        self._recent_accepts: collections.deque[float] = collections.deque()
        self.max_connections_per_peer: int | None = None
        self.max_connections: int | None = None
        self.on_connection_refused: Callable[[str], None] | None = None  # told the refusal reason
        self.on_associate_answered: Callable[[tuple[int, int, int] | None], None] | None = None  # None: accepted
        self._open_connections: dict[str, list[socket.socket]] = {}
        self.active_associations: set[Association] = set()
        self._active_lock = threading.Lock()
        super().__init__(address, socketserver.BaseRequestHandler)

    # --- binding and accepting -----------------------------------------------------------------

    def server_bind(self) -> None:
        if self._listening_socket is not None:
            self.socket.close()  # the one TCPServer made for us
            self.socket = self._listening_socket
            self.server_address = self.socket.getsockname()
            return
        if hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def server_activate(self) -> None:
        if self._listening_socket is None:
            super().server_activate()

    def server_close(self) -> None:
        if self._listening_socket is not None:
            # No shutdown(): on a socket shared with other processes it stops them accepting too.
            self.socket.close()
            return
        super().server_close()

    def get_request(self):
        # A shared listening socket is non-blocking (another process may take the connection
        # first: accept() then raises BlockingIOError, which socketserver ignores).
        if self._listening_socket is not None:
            self._accept_defer()
        client_socket, address = self.socket.accept()
        if self._listening_socket is not None:
            self._recent_accepts.append(time.monotonic())
        client_socket.setblocking(True)
        # Without it, a Nagle-enabled sender waits ~40 ms for a delayed ACK on every response.
        client_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            # Wrapped here (no I/O yet), so the socket counted as open by _connection_refusal is the
            # one the association uses (wrapping detaches the plain socket); the handshake, which
            # waits on the peer, runs on the connection's own thread (process_request_thread).
            client_socket = self.ssl_context.wrap_socket(client_socket, server_side=True, do_handshake_on_connect=False)
        return client_socket, address

    def _accept_defer(self) -> None:
        """Every process wakes for a new connection; a busy one waits a little so an idle one takes it."""
        now = time.monotonic()
        recent = self._recent_accepts
        while recent and now - recent[0] > self.accept_recent:
            recent.popleft()
        busy = len(self.active_associations) + len(recent)
        if busy:
            time.sleep(min(self.accept_defer * busy, self.accept_defer_max))

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
        # Closed sockets leave the count here, on the accepting thread, so no association path
        # has to remember to decrement.
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
        try:
            if isinstance(request, ssl.SSLSocket) and not _tls_handshake(
                request, client_address, self.acceptor.acse_timeout
            ):
                return
            assoc = Association(peer_address=client_address[0], peer_port=client_address[1], sock=request)
            try:
                AssociationRunner(self, assoc).run()
            finally:
                self.handler.association_ended(assoc)
        except Exception:
            logger.exception("association from %s ended by an unexpected error", client_address[0])
        finally:
            self.shutdown_request(request)

    def association_add(self, assoc: Association) -> None:
        with self._active_lock:
            self.active_associations.add(assoc)

    def association_remove(self, assoc: Association) -> None:
        with self._active_lock:
            self.active_associations.discard(assoc)

    def abort_all(self) -> None:
        """Abort every running association (A-ABORT, then close): shutdown after the grace period."""
        with self._active_lock:
            running = list(self.active_associations)
        for assoc in running:
            _send_quietly(assoc.sock, abort_pdu(SOURCE_PROVIDER, ABORT_NOT_SPECIFIED))
            try:
                assoc.sock.shutdown(socket.SHUT_RDWR)  # wakes its thread from recv()
            except OSError:
                pass


class AssociationSlots:
    """The associations one listener (all its ports) may run at once (PACSLENS_DICOM_MAX_ASSOCIATIONS)."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._count = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._count >= self.maximum:
                return False
            self._count += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._count -= 1


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


# --- encoding ------------------------------------------------------------------------------------


def abort_pdu(source: int, reason: int) -> bytes:
    return struct.pack(">BBLBBBB", ABORT, 0, 4, 0, 0, source, reason)


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BBLBBBB", ASSOCIATE_RJ, 0, 4, 0, result, source, reason)


RELEASE_RP_PDU = struct.pack(">BBLL", RELEASE_RP, 0, 4, 0)


def _implicit(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _uid_bytes(uid: str) -> bytes:
    return _even(uid.encode("ascii", "replace"), b"\0")


def response_command(
    command_field: int,
    sop_class_uid: str,
    sop_instance_uid: str | None,
    message_id: int,
    status: int,
    comment: str = "",
) -> bytes:
    """A C-STORE-RSP or C-ECHO-RSP command set, Implicit VR Little Endian (PS3.7 9.3.1.2, 9.3.5.2)."""
    parts = [
        _implicit(0x0002, _uid_bytes(sop_class_uid)),
        _implicit(0x0100, struct.pack("<H", command_field)),
        _implicit(0x0120, struct.pack("<H", message_id)),
        _implicit(0x0800, struct.pack("<H", NO_DATA_SET)),
        _implicit(0x0900, struct.pack("<H", status)),
    ]
    if comment:  # Error Comment, LO: at most 64 characters, no backslash or control characters
        text = "".join(ch if 0x20 <= ord(ch) < 0x7F and ch != "\\" else " " for ch in comment)[:64]
        parts.append(_implicit(0x0902, _even(text.encode("ascii"), b" ")))
    if sop_instance_uid is not None:
        parts.append(_implicit(0x1000, _uid_bytes(sop_instance_uid)))
    body = b"".join(parts)
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


def pdata_pdu(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF carrying a whole command set as one last fragment (responses are small)."""
    item_length = len(command) + 2
    return struct.pack(">BBLLBB", P_DATA_TF, 0, item_length + 4, item_length, context_id, 0x03) + command


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """File Meta Information, Explicit VR Little Endian, as pydicom writes it for these values (PS3.10 7.1)."""
    version_name = _even(PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" ")
    body = b"".join(
        (
            struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
            _explicit_short(0x0002, b"UI", _uid_bytes(sop_class_uid)),
            _explicit_short(0x0003, b"UI", _uid_bytes(sop_instance_uid)),
            _explicit_short(0x0010, b"UI", _uid_bytes(transfer_syntax)),
            _explicit_short(0x0012, b"UI", _uid_bytes(str(PYNETDICOM_IMPLEMENTATION_UID))),
            _explicit_short(0x0013, b"SH", version_name),
        )
    )
    return b"\0" * 128 + b"DICM" + _explicit_short(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _explicit_short(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


# --- decoding ------------------------------------------------------------------------------------


def command_decode(data: bytes) -> dict[int, bytes]:
    """A command set (Implicit VR Little Endian, group 0000 only) as {element: value}."""
    values: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 8:
            raise ProtocolError("command set cut short")
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if group != 0x0000 or length > end - offset:
            raise ProtocolError("malformed command set")
        values[element] = data[offset : offset + length]
        offset += length
    return values


def _uint16(values: dict[int, bytes], element: int) -> int | None:
    value = values.get(element)
    if value is None or len(value) != 2:
        return None
    return int(struct.unpack("<H", value)[0])


def _text(values: dict[int, bytes], element: int) -> str:
    return values.get(element, b"").rstrip(b"\0 ").decode("ascii", "replace")


# --- one association -----------------------------------------------------------------------------


class AssociationRunner:
    """Runs one association on the calling thread, from A-ASSOCIATE-RQ to release or abort."""

    def __init__(self, server: AcceptorServer, assoc: Association) -> None:
        self.server = server
        self.settings = server.acceptor
        self.assoc = assoc
        self.sock = assoc.sock
        self._buffer: bytearray | None = None
        self._command = bytearray()
        self._command_context = 0
        self._pending: _PendingStore | None = None  # a C-STORE whose data set is arriving
        self._slot = False  # holds one of the listener's association slots
        self._incoming_path: Path | None = None  # looked up (and made) once per association

    def run(self) -> None:
        self.sock.settimeout(self.settings.acse_timeout)
        try:
            self._associate()
            if not self.assoc.established:
                return
            self.server.association_add(self.assoc)
            self.sock.settimeout(self.settings.network_timeout)
            self._serve()
        except ProtocolError as exc:
            self._abort(exc)
        except NetworkTimeout:
            if self.assoc.established:  # PS3.8 9.2.3 (ARTIM expired before the request: just close)
                logger.warning("aborting association from %s: network timeout", self.assoc.peer_address)
                _send_quietly(self.sock, abort_pdu(SOURCE_PROVIDER, ABORT_NOT_SPECIFIED))
        except PeerGone:
            pass
        finally:
            self._pending_discard()
            self.server.association_remove(self.assoc)
            if self._slot:
                self.server.slots.give_back()

    def _incoming(self, again: bool) -> Path:
        if self._incoming_path is None or again:
            self._incoming_path = self.settings.incoming_dir()
        return self._incoming_path

    # socket reads ---------------------------------------------------------------------------

    def _recv_exact(self, count: int) -> bytes:
        """`count` bytes (small: headers, commands, A-ASSOCIATE-RQ), growing only as they arrive."""
        chunks = []
        remaining = count
        while remaining:
            try:
                chunk = self.sock.recv(min(remaining, 65536))
            except TimeoutError as exc:
                raise NetworkTimeout() from exc
            except OSError as exc:
                raise PeerGone() from exc
            if not chunk:
                raise PeerGone()
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def _pdu_header(self) -> tuple[int, int]:
        pdu_type, _, length = struct.unpack(">BBL", self._recv_exact(6))
        return pdu_type, length

    def _refuse_claim(self, pdu_type: int, length: int, limit: int) -> ProtocolError:
        reason = "associate-rq-too-large" if pdu_type == ASSOCIATE_RQ else "pdu-too-large"
        logger.warning(
            "aborting association from %s: PDU type 0x%02X claims %d bytes, more than %d",
            self.assoc.peer_address,
            pdu_type,
            length,
            limit,
        )
        return ProtocolError("PDU too long", ABORT_INVALID_PARAMETER, counted_as=reason)

    # association establishment -----------------------------------------------------------------

    def _associate(self) -> None:
        """Read the A-ASSOCIATE-RQ and answer it: accepted, `assoc.established`."""
        pdu_type, length = self._pdu_header()
        if pdu_type != ASSOCIATE_RQ:
            if pdu_type == ABORT:
                raise PeerGone()  # PS3.8 9.2 state Sta2: an A-ABORT PDU is not answered, just closed (AA-2)
            if pdu_type in (RELEASE_RQ, P_DATA_TF, ASSOCIATE_AC, ASSOCIATE_RJ, RELEASE_RP):
                raise ProtocolError("expected an A-ASSOCIATE-RQ", ABORT_UNEXPECTED_PDU)
            raise ProtocolError("unrecognised PDU type", ABORT_UNRECOGNISED_PDU)
        if length > MAXIMUM_ASSOCIATE_RQ:
            raise self._refuse_claim(pdu_type, length, MAXIMUM_ASSOCIATE_RQ)
        body = self._recv_exact(length)
        try:
            pdu = A_ASSOCIATE_RQ()
            pdu.decode(struct.pack(">BBL", pdu_type, 0, length) + body)
            request = pdu.to_primitive()
        except Exception as exc:  # any decoding failure is an invalid PDU
            logger.warning("cannot decode an A-ASSOCIATE-RQ from %s: %s", self.assoc.peer_address, type(exc).__name__)
            raise ProtocolError("undecodable A-ASSOCIATE-RQ", ABORT_INVALID_PARAMETER) from exc
        self.assoc.calling_ae_title = str(request.calling_ae_title).strip()
        self.assoc.called_ae_title = str(request.called_ae_title).strip()
        if not self.assoc.calling_ae_title:
            raise ProtocolError("empty calling AE title", ABORT_INVALID_PARAMETER)

        refusal = self._refusal(pdu.protocol_version, request)
        if refusal is None:
            self._slot = self.server.slots.take()
            if not self._slot:
                refusal = (REJECT_LOCAL_LIMIT, "too many associations")
        if refusal is not None:
            (result, source, reason), why = refusal
            logger.warning(
                "rejecting association from %s (%s): %s", self.assoc.calling_ae_title, self.assoc.peer_address, why
            )
            _send_quietly(self.sock, reject_pdu(result, source, reason))
            self._answered((result, source, reason))
            return
        self._accept(request)
        self.assoc.established = True
        self._answered(None)

    def _refusal(self, protocol_version: int, request: A_ASSOCIATE) -> tuple[tuple[int, int, int], str] | None:
        if not protocol_version & 0x0001:
            return REJECT_PROTOCOL_VERSION, "protocol version not supported"
        if str(request.application_context_name) != APPLICATION_CONTEXT_NAME:
            return REJECT_APPLICATION_CONTEXT, "application context not supported"
        if self.assoc.called_ae_title != self.settings.ae_title.strip():
            return REJECT_CALLED_AE, "called AE title not recognised"
        try:
            return self.server.handler.association_requested(self.assoc)
        except Exception as exc:
            # Fail closed, and transiently, so the sender retries once the database answers again.
            return (0x02, 0x03, 0x01), f"allow-list check failed ({type(exc).__name__})"

    def _accept(self, request: A_ASSOCIATE) -> None:
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in request.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None
        }
        results, role_items = negotiate_as_acceptor(
            request.presentation_context_definition_list, self.settings.supported, roles or None
        )
        for context in results:
            if context.result == 0x00 and context.context_id is not None:
                self.assoc.accepted_contexts[context.context_id] = (
                    str(context.abstract_syntax),
                    str(context.transfer_syntax[0]),
                )
        answer = A_ASSOCIATE()
        answer.application_context_name = APPLICATION_CONTEXT_NAME
        answer.calling_ae_title = request.calling_ae_title
        answer.called_ae_title = request.called_ae_title
        answer.result = 0x00
        answer.result_source = 0x01
        answer.presentation_context_definition_results_list = results
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = self.settings.maximum_pdu_size
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        items: list = [maximum, implementation, version, *role_items]
        if any(isinstance(item, AsynchronousOperationsWindowNegotiation) for item in request.user_information):
            window = AsynchronousOperationsWindowNegotiation()
            window.maximum_number_operations_invoked = 1
            window.maximum_number_operations_performed = 1
            items.append(window)
        answer.user_information = items
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(answer)
        self._send(pdu.encode())

    def _answered(self, reject: tuple[int, int, int] | None) -> None:
        if self.server.on_associate_answered is not None:
            self.server.on_associate_answered(reject)

    # established ---------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            pdu_type, length = self._pdu_header()
            if pdu_type == P_DATA_TF:
                limit = self.settings.maximum_pdu_size + PDU_MARGIN
                if length > limit:
                    raise self._refuse_claim(pdu_type, length, limit)
                self._pdata(length)
            elif pdu_type == RELEASE_RQ:
                if length > OTHER_PDU_MAXIMUM:
                    raise self._refuse_claim(pdu_type, length, OTHER_PDU_MAXIMUM)
                self._recv_exact(length)
                self._pending_discard()
                self.assoc.released = True
                _send_quietly(self.sock, RELEASE_RP_PDU)
                return
            elif pdu_type == ABORT:
                return  # the peer aborted: nothing to answer
            elif pdu_type in (ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, RELEASE_RP):
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}", ABORT_UNEXPECTED_PDU)
            else:
                raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNISED_PDU)

    def _pdata(self, length: int) -> None:
        """One P-DATA-TF: its PDV items in turn, data set fragments straight to the pending file."""
        remaining = length
        while remaining:
            if remaining < 6:
                raise ProtocolError("P-DATA-TF item cut short")
            item_length, context_id, control = struct.unpack(">LBB", self._recv_exact(6))
            remaining -= 6
            value_length = item_length - 2
            if item_length < 2 or value_length > remaining:
                raise ProtocolError("PDV item length does not fit its PDU")
            remaining -= value_length
            if context_id not in self.assoc.accepted_contexts:
                raise ProtocolError("PDV on a presentation context that was not accepted")
            last = bool(control & 0x02)
            if control & 0x01:
                self._command_fragment(context_id, value_length, last)
            else:
                self._data_fragment(context_id, value_length, last)

    def _command_fragment(self, context_id: int, length: int, last: bool) -> None:
        if self._pending is not None:
            raise ProtocolError("a command arrived before the previous data set ended")
        if self._command and context_id != self._command_context:
            raise ProtocolError("command fragments on different presentation contexts")
        if len(self._command) + length > MAXIMUM_COMMAND:
            raise ProtocolError("command set too long")
        self._command_context = context_id
        self._command += self._recv_exact(length)
        if last:
            command = command_decode(bytes(self._command))
            self._command.clear()
            self._command_received(context_id, command)

    def _command_received(self, context_id: int, command: dict[int, bytes]) -> None:
        field_ = _uint16(command, 0x0100)
        message_id = _uint16(command, 0x0110)
        data_set_type = _uint16(command, 0x0800)
        if field_ is None or message_id is None or data_set_type is None:
            raise ProtocolError("command set without its command field, message ID or data set type")
        abstract, transfer = self.assoc.accepted_contexts[context_id]
        if field_ == C_ECHO_RQ:
            status = 0x0000 if abstract == VERIFICATION else SOP_CLASS_NOT_SUPPORTED
            if data_set_type != NO_DATA_SET:
                raise ProtocolError("C-ECHO-RQ with a data set")
            self._respond(context_id, C_ECHO_RSP, VERIFICATION, None, message_id, status)
            return
        if field_ != C_STORE_RQ:
            if data_set_type != NO_DATA_SET:
                raise ProtocolError(f"unsupported DIMSE command 0x{field_:04X}")
            self._respond(context_id, field_ | 0x8000, _text(command, 0x0002), None, message_id, UNRECOGNISED_OPERATION)
            return
        if data_set_type == NO_DATA_SET:
            self._respond(
                context_id,
                C_STORE_RSP,
                _text(command, 0x0002),
                _text(command, 0x1000),
                message_id,
                CANNOT_UNDERSTAND,
                "C-STORE-RQ without a data set",
            )
            return
        request = StoreRequest(
            message_id=message_id,
            sop_class_uid=_text(command, 0x0002),
            sop_instance_uid=_text(command, 0x1000),
            transfer_syntax_uid=transfer,
            abstract_syntax=abstract,
            path=Path(),
            move_originator_ae_title=_text(command, 0x1030).strip(),
        )
        self._pending = _PendingStore.open(self._incoming, request, context_id)
        self.sock.settimeout(self.settings.dimse_timeout)

    def _data_fragment(self, context_id: int, length: int, last: bool) -> None:
        pending = self._pending
        if pending is None:
            raise ProtocolError("a data set fragment without its command")
        if context_id != pending.context_id:
            raise ProtocolError("data set fragments on a different presentation context than their command")
        if self._buffer is None:
            self._buffer = bytearray(READ_CHUNK)
        view = memoryview(self._buffer)
        remaining = length
        while remaining:
            try:
                count = self.sock.recv_into(view[: min(remaining, READ_CHUNK)])
            except TimeoutError as exc:
                raise NetworkTimeout() from exc
            except OSError as exc:
                raise PeerGone() from exc
            if not count:
                raise PeerGone()
            pending.write(view[:count])
            remaining -= count
        if last:
            self._pending = None
            self.sock.settimeout(self.settings.network_timeout)
            self._store(pending)

    def _store(self, pending: _PendingStore) -> None:
        finished = pending.finish()
        request = pending.request
        if finished is None:
            status, comment = OUT_OF_RESOURCES, "Out of resources: the data set could not be written"
        elif request.sop_class_uid != request.abstract_syntax:
            request.path.unlink(missing_ok=True)
            status, comment = SOP_CLASS_NOT_SUPPORTED, "SOP Class differs from the presentation context's"
        else:
            status, comment = self.server.handler.store(self.assoc, request)
        if status == 0x0000:
            self.assoc.instances_received += 1
        self._respond(
            pending.context_id,
            C_STORE_RSP,
            request.sop_class_uid,
            request.sop_instance_uid,
            request.message_id,
            status,
            comment if status else "",
        )

    def _respond(
        self,
        context_id: int,
        command_field: int,
        sop_class_uid: str,
        sop_instance_uid: str | None,
        message_id: int,
        status: int,
        comment: str = "",
    ) -> None:
        command = response_command(command_field, sop_class_uid, sop_instance_uid, message_id, status, comment)
        self._send(pdata_pdu(context_id, command))

    # endings -----------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (TimeoutError, OSError) as exc:
            raise PeerGone() from exc

    def _abort(self, exc: ProtocolError) -> None:
        if exc.counted_as is not None:
            with _refused_lock:
                _refused[(PDUS_REFUSED_COUNTER, exc.counted_as)] += 1
        else:
            logger.warning("aborting association from %s: %s", self.assoc.peer_address, exc)
        _send_quietly(self.sock, abort_pdu(SOURCE_PROVIDER, exc.reason))

    def _pending_discard(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.discard()


class _PendingStore:
    """A C-STORE's data set being written to its temporary file, after a File Meta header.

    A write that fails (disk full, I/O error) marks it failed: the rest of the data set is still
    read off the socket, and the C-STORE is answered Out of Resources.
    """

    def __init__(self, request: StoreRequest, context_id: int) -> None:
        self.fd = -1
        self.path: Path | None = None
        self.request = request
        self.context_id = context_id
        self.failed = False
        self.written = 0  # bytes written so far
        self.flushing_from = 0  # bytes before this offset are already on their way to the disk

    @classmethod
    def open(cls, folder: Callable[[bool], Path], request: StoreRequest, context_id: int) -> _PendingStore:
        pending = cls(request, context_id)
        try:  # creating the folder may fail as well (incoming_dir makes it when missing)
            try:
                fd, name = tempfile.mkstemp(dir=folder(False), suffix=".part")
            except FileNotFoundError:  # removed since this association looked it up: make it again
                fd, name = tempfile.mkstemp(dir=folder(True), suffix=".part")
        except OSError as exc:
            pending._fail(exc)
            return pending
        pending.fd, pending.path = fd, Path(name)
        pending.write(file_meta_bytes(request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax_uid))
        return pending

    def write(self, data) -> None:
        if self.failed:
            return
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
                self.written += written
        except OSError as exc:
            self._fail(exc)
            return
        if self.written - self.flushing_from >= WRITEBACK_START:
            # Start writing these pages to the disk now, while the rest arrives: the fsync before
            # Success then waits for the tail only (measured: 512 KB, 0.8-1.0 ms -> 0.23 ms).
            writeback_start(self.fd, self.flushing_from, self.written - self.flushing_from)
            self.flushing_from = self.written

    def _fail(self, exc: OSError) -> None:
        logger.error("cannot write a received data set to %s: %s", self.path or "incoming", exc.strerror)
        self.failed = True
        self.discard()

    def finish(self) -> StoreRequest | None:
        """The request with its closed file; None when writing it failed."""
        if self.failed or self.path is None:
            return None
        try:
            os.close(self.fd)
        except OSError as exc:
            self.fd = -1
            self._fail(exc)
            return None
        self.fd = -1
        self.request.path = self.path
        return self.request

    def discard(self) -> None:
        if self.fd != -1:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        if self.path is not None:
            self.path.unlink(missing_ok=True)


WRITEBACK_START = 64 * 1024  # received bytes between two writeback starts
SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Callable[[int, int, int, int], int] | None = None


def _sync_file_range_load() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


def writeback_start(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a file range to the disk without waiting for it
    (sync_file_range(SYNC_FILE_RANGE_WRITE)). Only a head start: durability is still the fsync's."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = _sync_file_range_load() or (lambda fd, offset, length, flags: 0)
    _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass
