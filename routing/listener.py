"""The DICOM listener: a pynetdicom SCP for C-ECHO and C-STORE.

It does the least work possible per instance (verify, write durably, record, answer); the
handlers here are thin and `routing.ingest.instance_store` does the work. Study completion
and everything after run in the workers.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import pynetdicom
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pydicom import config as pydicom_config

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.utils import timezone
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
import pynetdicom.dimse_messages
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from routing.ingest import disk_space_low, incoming_dir, instance_store
from routing.models import ApplicationEntity, StoreAssociation
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

ALLOW_LIST_TTL = 5.0  # seconds an allow-list read from the database is reused

# Largest PDU we accept. pynetdicom's default (16 KiB) costs a Python round trip per 16 KiB;
# dcmtk sends up to 128 KiB when allowed. Bounded, so one PDU never costs much memory.
MAXIMUM_PDU_SIZE = 1024 * 1024


class ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's server plus SO_REUSEPORT (several listener processes share one port)
    and TCP_NODELAY on accepted sockets (without it, a Nagle-enabled sender waits ~40 ms
    for a delayed ACK on every response)."""

    def server_bind(self) -> None:
        if hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self):
        client_socket, address = super().get_request()
        client_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client_socket, address


class DicomListener:
    """One listening AE. `start()` returns at once; `stop()` drains running associations."""

    def __init__(self, *, host: str | None = None, port: int | None = None, ae_title: str | None = None) -> None:
        self.host = host if host is not None else settings.DICOM_HOST
        self.port = port if port is not None else settings.DICOM_PORT
        self.ae_title = ae_title or settings.AE_TITLE
        self.server: ReusePortServer | None = None
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self._allow_list: dict[str, ApplicationEntity] = {}
        self._allow_list_read_at = 0.0
        self._lock = threading.Lock()

    def start(self) -> ReusePortServer:
        # Receive straight to a temporary file under the data dir: bounded memory for huge
        # instances, and the final rename stays on one filesystem.
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(incoming_dir())
        # Identifiers (patient names and IDs) must never reach our logs.
        _config.LOG_HANDLER_LEVEL = "none"
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        # pydicom re-validates every value pynetdicom sets on its command datasets; we check the
        # UIDs that matter ourselves (routing.ingest), so skip the cost and the warnings.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE

        pynetdicom_speedups()
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
        ae.maximum_associations = settings.DICOM_MAX_ASSOCIATIONS
        ae.acse_timeout = settings.DICOM_ACSE_TIMEOUT
        ae.dimse_timeout = settings.DICOM_DIMSE_TIMEOUT
        ae.network_timeout = settings.DICOM_NETWORK_TIMEOUT
        ae.require_called_aet = True
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        handlers = [
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_RELEASED, self.handle_ended, [True]),
            (evt.EVT_ABORTED, self.handle_ended, [False]),
            (evt.EVT_CONN_CLOSE, self.handle_ended, [False]),
        ]
        self.server = ae.make_server((self.host, self.port), evt_handlers=handlers, server_class=ReusePortServer)
        ae._servers.append(self.server)  # as AE.start_server does; server.shutdown() removes it
        thread = threading.Thread(target=self.server.serve_forever, name="dicom-listener", daemon=True)
        thread.start()
        self.port = self.server.server_address[1]
        logger.info("DICOM listener %s on %s:%s (%s)", self.ae_title, self.host, self.port, self.identity)
        return self.server

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let running associations finish for up to `grace` seconds, then abort the rest."""
        if not self.server:
            return
        grace = settings.DICOM_SHUTDOWN_GRACE if grace is None else grace
        server, self.server = self.server, None
        server.shutdown()  # stops accepting new connections and closes the listening socket
        deadline = time.monotonic() + grace
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        for assoc in server.active_associations:
            assoc.abort()

    # --- handlers: thin, the work lives in routing.ingest -------------------------------------

    def handle_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        # requestor.ae_title is filled only after negotiation; the A-ASSOCIATE-RQ has it now.
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        reject = None
        if disk_space_low():
            reject = REJECT_CONGESTION
            reason = "free disk space below the floor"
        else:
            sender = self._allowed_sender(calling, assoc.requestor.address)
            if sender is None and not settings.DICOM_ACCEPT_ANY_CALLING_AE:
                reject = REJECT_CALLING_AE
                reason = "calling AE title not recognised"
        if reject:
            logger.warning("rejecting association from %s (%s): %s", calling, assoc.requestor.address, reason)
            assoc.acse.send_reject(*reject)
            assoc.kill()

    def handle_echo(self, event: evt.Event) -> int:
        return 0x0000

    def handle_store(self, event: evt.Event) -> int | tuple:
        request = event.request
        assoc = event.assoc
        association_id = self._association_row(assoc)
        calling = assoc.requestor.ae_title.strip()
        sender = self._allowed_sender(calling, assoc.requestor.address)
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
            assoc._pacslens_count = getattr(assoc, "_pacslens_count", 0) + 1
            return 0x0000
        return result.status

    def handle_ended(self, event: evt.Event, released: bool) -> None:
        """Close the association's row and ask the workers to check its studies for completion."""
        assoc = event.assoc
        association_id = getattr(assoc, "_pacslens_association_id", None)
        released = released or getattr(assoc, "_pacslens_releasing", False)
        try:
            if association_id is None:
                return
            assoc._pacslens_association_id = None  # release and connection close both fire
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
                self._allow_list_read_at = time.monotonic()
            sender = self._allow_list.get(calling)
        if sender and sender.check_peer_ip and not _same_host(sender.host, address):
            return None
        return sender

    def refresh_allow_list(self) -> None:
        self._allow_list_read_at = 0.0


def _same_host(configured: str, address: str) -> bool:
    try:
        return address in {info[4][0] for info in socket.getaddrinfo(configured, None)}
    except OSError:
        return False


# --- pynetdicom speed-ups --------------------------------------------------------------------------
# Measured (bench/listener.py): pynetdicom spends more time waiting than working. Its two threads
# per association each sleep 1 ms whenever they find nothing to do, so every instance waits for
# a wake-up to pick up the request and another to send the response; and it reads the socket
# 4 KiB per recv(). These replacements keep pynetdicom's logic and only change how it waits and
# reads. They are written against pynetdicom 3.0.4 and apply to that version only.

PATCHED_PYNETDICOM = "3.0.4"
REACTOR_WAIT = 0.005  # seconds a reactor blocks waiting for work before checking its timers


def pynetdicom_speedups() -> bool:
    """Install the replacements once per process; False (stock pynetdicom) on another version."""
    if pynetdicom.__version__ != PATCHED_PYNETDICOM:
        logger.warning("pynetdicom %s is not %s: running without speed-ups", pynetdicom.__version__, PATCHED_PYNETDICOM)
        return False
    if getattr(AssociationSocket.recv, "_pacslens", False):
        return True
    AssociationSocket.recv = _socket_recv
    DULServiceProvider.run_reactor = _dul_run_reactor
    DULServiceProvider.send_pdu = _dul_send_pdu
    Association._run_reactor = _association_run_reactor
    DIMSEServiceProvider.send_msg = _dimse_send_msg
    pynetdicom.dimse_messages.create_file_meta = _create_file_meta
    pynetdicom.dimse_messages.write_file_meta_info = _write_file_meta_info
    return True


_stock_dul_run_reactor = DULServiceProvider.run_reactor
_stock_dul_send_pdu = DULServiceProvider.send_pdu
_stock_association_run_reactor = Association._run_reactor
_stock_dimse_send_msg = DIMSEServiceProvider.send_msg
_stock_create_file_meta = pynetdicom.dimse_messages.create_file_meta
_stock_write_file_meta_info = pynetdicom.dimse_messages.write_file_meta_info


def _socket_recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """AssociationSocket.recv: read straight into one buffer, as much as the kernel has."""
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    nr_read = 0
    try:
        while nr_read < nr_bytes:
            count = self.socket.recv_into(view[nr_read:], nr_bytes - nr_read)
            if not count:  # connection closed: return what we have, as pynetdicom does
                break
            nr_read += count
    finally:
        view.release()
    if nr_read < nr_bytes:
        del buffer[nr_read:]
    return buffer


_socket_recv._pacslens = True  # type: ignore[attr-defined]


def _dul_send_pdu(self: DULServiceProvider, primitive) -> None:
    """DULServiceProvider.send_pdu, then wake the reactor so the response leaves at once."""
    _stock_dul_send_pdu(self, primitive)
    wake = getattr(self, "_pacslens_wake", None)
    if wake is not None:
        try:
            wake[1].send(b"\0")
        except OSError:  # closed (reactor ended) or full (a wake-up is pending anyway)
            pass


def _dul_wait(self: DULServiceProvider, wake: socket.socket) -> None:
    """Instead of sleeping: block until the peer sends, the user queues a PDU, or REACTOR_WAIT passes."""
    sock = self.socket.socket if self.socket is not None else None
    if sock is None or getattr(sock, "pending", lambda: 0)():  # TLS may hold decrypted bytes select can't see
        time.sleep(0 if sock is not None else self._run_loop_delay)
        return
    try:
        ready, _, _ = select.select([sock, wake], [], [], REACTOR_WAIT)
    except (OSError, ValueError):  # socket closed under us: the loop notices
        time.sleep(self._run_loop_delay)
        return
    if wake in ready:
        try:
            wake.recv(4096)
        except OSError:
            pass


def _dul_run_reactor(self: DULServiceProvider) -> None:
    """DULServiceProvider.run_reactor of pynetdicom 3.0.4, waiting on the socket instead of sleeping."""
    if not self.assoc.is_acceptor:
        return _stock_dul_run_reactor(self)
    wake_read, wake_write = socket.socketpair()
    wake_write.setblocking(False)
    self._pacslens_wake = (wake_read, wake_write)
    try:
        self._idle_timer.start()
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                _dul_wait(self, wake_read)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                # As pynetdicom: bypass the state machine, send an A-ABORT and stop both reactors.
                logger.error("Exception in the DUL reactor, aborting association: %s", type(exc).__name__)
                from pynetdicom.pdu import A_ABORT_RQ

                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            sleep = False
    finally:
        self._pacslens_wake = None
        wake_read.close()
        wake_write.close()


def _association_run_reactor(self: Association) -> None:
    """Association._run_reactor of pynetdicom 3.0.4 (acceptor side), blocking on the DIMSE message
    queue instead of sleeping 1 ms before each look."""
    if not self.is_acceptor:
        return _stock_association_run_reactor(self)
    self._is_paused = False
    while not self._kill:
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        try:
            context_id, msg = self.dimse.msg_queue.get(timeout=REACTOR_WAIT)
        except queue.Empty:
            context_id, msg = None, None
        if msg:
            self._serve_request(msg, context_id)

        if self.is_established and self.acse.is_release_requested():
            # The peer may close the connection as soon as it has our answer, and EVT_CONN_CLOSE
            # can then fire (on the DUL thread) before EVT_RELEASED below: it was still a release.
            self._pacslens_releasing = True
            self.acse.send_release(is_response=True)
            logger.debug("association released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires for subscribers
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            logger.warning("network timeout reached, aborting association")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


# pynetdicom builds a pydicom Dataset and encodes it twice to answer each C-STORE, and another to
# write each received file's meta header: a third of its CPU per instance. Both have a fixed
# layout; the encoders below produce the same bytes (tests/test_listener*.py compare stored files).


def _dimse_send_msg(self: DIMSEServiceProvider, primitive, context_id: int) -> None:
    """DIMSEServiceProvider.send_msg with a direct encoding of plain C-STORE responses."""
    if (
        type(primitive) is C_STORE
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.ErrorComment is None
        and primitive.OffendingElement is None
        and primitive.Status is not None
        and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
    ):
        command = _store_response_command(
            str(primitive.AffectedSOPClassUID),
            str(primitive.AffectedSOPInstanceUID),
            int(primitive.MessageIDBeingRespondedTo),
            int(primitive.Status),
        )
        if command is not None:
            pdata = P_DATA()
            pdata.presentation_data_value_list.append([context_id, b"\x03" + command])  # command, last fragment
            self.dul.send_pdu(pdata)
            return
    _stock_dimse_send_msg(self, primitive, context_id)


def _store_response_command(sop_class_uid: str, sop_instance_uid: str, message_id: int, status: int) -> bytes | None:
    """A C-STORE-RSP command set, Implicit VR Little Endian (PS3.7 9.3.1.2); None if a UID is not plain ASCII."""
    try:
        body = b"".join(
            (
                _implicit(0x0002, _uid_bytes(sop_class_uid)),
                _implicit(0x0100, struct.pack("<H", 0x8001)),  # Command Field: C-STORE-RSP
                _implicit(0x0120, struct.pack("<H", message_id)),
                _implicit(0x0800, struct.pack("<H", 0x0101)),  # no data set
                _implicit(0x0900, struct.pack("<H", status)),
                _implicit(0x1000, _uid_bytes(sop_instance_uid)),
            )
        )
    except (UnicodeEncodeError, struct.error):
        return None
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


def _implicit(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid_bytes(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" if len(value) % 2 else value


class _FileMeta(tuple):
    """What pynetdicom's create_file_meta would put in a FileMetaDataset, for _write_file_meta_info."""


def _create_file_meta(*, sop_class_uid, sop_instance_uid, transfer_syntax, **kwargs):
    if kwargs:
        return _stock_create_file_meta(
            sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid, transfer_syntax=transfer_syntax, **kwargs
        )
    return _FileMeta((str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax)))


def _write_file_meta_info(fp, file_meta, *args, **kwargs) -> None:
    """File Meta Information, Explicit VR Little Endian, as pydicom writes pynetdicom's defaults."""
    if not isinstance(file_meta, _FileMeta):
        return _stock_write_file_meta_info(fp, file_meta, *args, **kwargs)
    sop_class_uid, sop_instance_uid, transfer_syntax = file_meta
    try:
        encoded = _file_meta_bytes(sop_class_uid, sop_instance_uid, transfer_syntax)
    except UnicodeEncodeError:
        meta = _stock_create_file_meta(
            sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid, transfer_syntax=transfer_syntax
        )
        return _stock_write_file_meta_info(fp, meta, *args, **kwargs)
    fp.write(encoded)


def _file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    version_name = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    if len(version_name) % 2:
        version_name += b" "
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
    return _explicit_short(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _explicit_short(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value
