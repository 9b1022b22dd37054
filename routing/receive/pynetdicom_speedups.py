"""Speed-ups for pynetdicom's receive path, installed by the DICOM listener (`routing.receive.listener`).

Measured (bench/listener.py): pynetdicom spends more time waiting than working. Its two threads
per association each sleep 1 ms whenever they find nothing to do, so every instance waits for a
wake-up to pick up the request and another to send the response; it reads the socket 4 KiB per
recv(); and it builds and encodes pydicom datasets to answer each C-STORE and to write each
received file's meta header. These replacements keep pynetdicom's logic and only change how it
waits, reads and encodes. They are written against pynetdicom 3.0.4 and apply to that version only;
the acceptor side only, except the socket read.

The same replacement of the PDU read bounds what a peer can make us hold: a PDU header is six
bytes that may claim 4 GiB, so a PDU longer than we negotiated (or an A-ASSOCIATE-RQ over 64 KiB)
aborts the association, and the bytes we do read land in a buffer that grows as they arrive.

Every pynetdicom internal is looked up by `pynetdicom_speedups()` after the version check, never
at import: on another pynetdicom a renamed internal must leave stock pynetdicom running, not
break the listener's import.
"""

from __future__ import annotations

import collections
import logging
import queue
import select
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, cast

import pynetdicom
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.transport import AssociationSocket

logger = logging.getLogger(__name__)

PATCHED_PYNETDICOM = "3.0.4"
REACTOR_WAIT = 0.005  # seconds a reactor blocks waiting for work before checking its timers

# PDU limits (PS3.8 9.3). A P-DATA-TF may be as long as the maximum PDU we announced plus its
# own 6-byte header; the margin forgives peers that count the header, or a PDV header, in it.
PDU_MARGIN = 1024
MAXIMUM_ASSOCIATE_RQ = 64 * 1024  # 128 presentation contexts with long UIDs take about 20 KiB
OTHER_PDU_MAXIMUM = 64 * 1024  # release and abort PDUs are 4 bytes long; AC/RJ never come to us
RECV_FIRST = 64 * 1024  # a read starts with this much buffer and doubles as bytes arrive
PDUS_REFUSED_COUNTER = "dicom_pdus_refused"  # OpsCounter name, label: the reason

_active = False
_maximum_pdu = 0  # set by pynetdicom_speedups(): the listener's maximum PDU size
_refused: collections.Counter[tuple[str, str]] = collections.Counter()
_refused_lock = threading.Lock()
# pynetdicom internals used by the replacements: set by pynetdicom_speedups(), after the version check.
_stock: dict[str, Any] = {}
_A_ABORT_RQ: Any = None
_C_STORE: Any = None
_P_DATA: Any = None


def pynetdicom_speedups(maximum_pdu_size: int) -> bool:
    """Install the replacements once per process; False (stock pynetdicom) on another version.

    `maximum_pdu_size` is the maximum PDU length the listener announces; longer PDUs abort.
    """
    global _active, _maximum_pdu
    if pynetdicom.__version__ != PATCHED_PYNETDICOM:
        logger.warning("pynetdicom %s is not %s: running without speed-ups", pynetdicom.__version__, PATCHED_PYNETDICOM)
        return False
    _maximum_pdu = maximum_pdu_size
    if _active:
        return True
    try:
        _install()
    except (ImportError, AttributeError) as exc:  # the version says 3.0.4 but an internal is missing
        logger.warning("pynetdicom internals differ (%s): running without speed-ups", exc)
        return False
    _active = True
    return True


def pynetdicom_speedups_active() -> bool:
    return _active


def pdus_refused_take() -> dict[tuple[str, str], int]:
    """PDUs refused since the last call, as OpsCounter deltas ((PDUS_REFUSED_COUNTER, reason) → count)."""
    with _refused_lock:
        taken = dict(_refused)
        _refused.clear()
    return taken


def _install() -> None:
    global _A_ABORT_RQ, _C_STORE, _P_DATA
    # Imported here, after the version check: on another pynetdicom these names may not exist.
    import pynetdicom.dimse_messages  # noqa: PLC0415
    from pynetdicom.association import Association  # noqa: PLC0415
    from pynetdicom.dimse import DIMSEServiceProvider  # noqa: PLC0415
    from pynetdicom.dimse_primitives import C_STORE  # noqa: PLC0415
    from pynetdicom.dul import DULServiceProvider  # noqa: PLC0415
    from pynetdicom.pdu import A_ABORT_RQ  # noqa: PLC0415
    from pynetdicom.pdu_primitives import P_DATA  # noqa: PLC0415
    from pynetdicom.transport import AssociationSocket  # noqa: PLC0415

    stock = {
        "dul_run_reactor": DULServiceProvider.run_reactor,
        "dul_send_pdu": DULServiceProvider.send_pdu,
        "dul_read_pdu_data": DULServiceProvider._read_pdu_data,
        "association_run_reactor": Association._run_reactor,
        "dimse_send_msg": DIMSEServiceProvider.send_msg,
        "create_file_meta": pynetdicom.dimse_messages.create_file_meta,
        "write_file_meta_info": pynetdicom.dimse_messages.write_file_meta_info,
        "socket_recv": AssociationSocket.recv,
    }
    _stock.update(stock)
    _A_ABORT_RQ, _C_STORE, _P_DATA = A_ABORT_RQ, C_STORE, P_DATA
    # monkeypatch: replacing pynetdicom's methods is the point of this module
    AssociationSocket.recv = _socket_recv  # type: ignore[method-assign]
    DULServiceProvider._read_pdu_data = _dul_read_pdu_data  # type: ignore[method-assign]
    DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
    DULServiceProvider.send_pdu = _dul_send_pdu  # type: ignore[method-assign]
    Association._run_reactor = _association_run_reactor  # type: ignore[method-assign]
    DIMSEServiceProvider.send_msg = _dimse_send_msg  # type: ignore[method-assign]
    pynetdicom.dimse_messages.create_file_meta = _create_file_meta
    pynetdicom.dimse_messages.write_file_meta_info = _write_file_meta_info


def _socket_recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """AssociationSocket.recv: read straight into one buffer that grows with the bytes received.

    Never sized from `nr_bytes` up front: that is what the peer claims, not what it sends.
    """
    sock = cast(socket.socket, self.socket)  # as pynetdicom's recv: set while the association reads
    buffer = bytearray(min(nr_bytes, RECV_FIRST))
    nr_read = 0
    while nr_read < nr_bytes:
        if nr_read == len(buffer):
            buffer.extend(bytes(min(len(buffer), nr_bytes - nr_read)))
        with memoryview(buffer) as view:
            count = sock.recv_into(view[nr_read:])
        if not count:  # connection closed: return what we have, as pynetdicom does
            break
        nr_read += count
    del buffer[nr_read:]
    return buffer


def _dul_read_pdu_data(self: DULServiceProvider) -> None:
    """DULServiceProvider._read_pdu_data, refusing a PDU longer than we allow before reading it."""
    if not self.assoc.is_acceptor:
        return _stock["dul_read_pdu_data"](self)
    sock = cast("AssociationSocket", self.socket)
    try:
        header = sock.recv(6)
    except (OSError, TimeoutError):
        self.event_queue.put("Evt17")  # transport connection closed
        return
    if len(header) != 6:
        self.event_queue.put("Evt17")
        return
    pdu_type, _, pdu_length = struct.unpack(">BBL", header)
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        self.event_queue.put("Evt19")  # unrecognised PDU: the state machine aborts
        return
    limit = _pdu_limit(pdu_type)
    if pdu_length > limit:
        _pdu_refuse(self, sock, pdu_type, pdu_length, limit)
        return
    try:
        body = sock.recv(pdu_length)
    except (OSError, TimeoutError):
        self.event_queue.put("Evt17")
        return
    if len(body) != pdu_length:
        self.event_queue.put("Evt17")  # the peer closed mid-PDU
        return
    try:
        pdu, event = self._decode_pdu(header + body)
    except Exception as exc:  # as pynetdicom: any decoding failure is an invalid PDU
        logger.warning(
            "cannot decode a PDU (type 0x%02X) from %s: %s", pdu_type, self.assoc.requestor.address, type(exc).__name__
        )
        self.event_queue.put("Evt19")
        return
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)


def _pdu_limit(pdu_type: int) -> int:
    if pdu_type == 0x04:
        return _maximum_pdu + PDU_MARGIN
    if pdu_type == 0x01:
        return MAXIMUM_ASSOCIATE_RQ
    return OTHER_PDU_MAXIMUM


def _pdu_refuse(self: DULServiceProvider, sock: AssociationSocket, pdu_type: int, length: int, limit: int) -> None:
    """Abort at once (A-ABORT, reason: invalid PDU parameter value) and close, without reading the PDU."""
    reason = "associate-rq-too-large" if pdu_type == 0x01 else "pdu-too-large"
    logger.warning(
        "aborting association from %s: PDU type 0x%02X claims %d bytes, more than %d",
        self.assoc.requestor.address,
        pdu_type,
        length,
        limit,
    )
    with _refused_lock:
        _refused[(PDUS_REFUSED_COUNTER, reason)] += 1
    abort_pdu = _A_ABORT_RQ()
    abort_pdu.source = 0x02  # service provider
    abort_pdu.reason_diagnostic = 0x06  # invalid PDU parameter value
    try:
        sock.send(abort_pdu.encode())
    except OSError:
        pass
    sock.close()  # Evt17: the state machine ends the association; the claimed bytes are never read


def _dul_send_pdu(self: DULServiceProvider, primitive) -> None:
    """DULServiceProvider.send_pdu, then wake the reactor so the response leaves at once."""
    _stock["dul_send_pdu"](self, primitive)
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
        return _stock["dul_run_reactor"](self)
    wake_read, wake_write = socket.socketpair()
    wake_write.setblocking(False)
    self._pacslens_wake = (wake_read, wake_write)  # type: ignore[attr-defined]  # our attribute on pynetdicom's object
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
                abort_pdu = _A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                # The socket is set while the reactor runs (pynetdicom casts it the same way).
                cast("AssociationSocket", self.socket).send(abort_pdu.encode())
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
        self._pacslens_wake = None  # type: ignore[attr-defined]  # our attribute on pynetdicom's object
        wake_read.close()
        wake_write.close()


def _association_run_reactor(self: Association) -> None:
    """Association._run_reactor of pynetdicom 3.0.4 (acceptor side), blocking on the DIMSE message
    queue instead of sleeping 1 ms before each look."""
    if not self.is_acceptor:
        return _stock["association_run_reactor"](self)
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
            self._serve_request(msg, cast(int, context_id))  # as pynetdicom: a message comes with its context

        if self.is_established and self.acse.is_release_requested():
            # The peer may close the connection as soon as it has our answer, and EVT_CONN_CLOSE
            # can then fire (on the DUL thread) before EVT_RELEASED below: it was still a release.
            self._pacslens_releasing = True  # type: ignore[attr-defined]  # our attribute, read by the listener
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
        type(primitive) is _C_STORE
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
            pdata = _P_DATA()
            pdata.presentation_data_value_list.append((context_id, b"\x03" + command))  # command, last fragment
            self.dul.send_pdu(pdata)
            return
    _stock["dimse_send_msg"](self, primitive, context_id)


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
        return _stock["create_file_meta"](
            sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid, transfer_syntax=transfer_syntax, **kwargs
        )
    return _FileMeta((str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax)))


def _write_file_meta_info(fp, file_meta, *args, **kwargs) -> None:
    """File Meta Information, Explicit VR Little Endian, as pydicom writes pynetdicom's defaults."""
    if not isinstance(file_meta, _FileMeta):
        return _stock["write_file_meta_info"](fp, file_meta, *args, **kwargs)
    sop_class_uid, sop_instance_uid, transfer_syntax = file_meta
    try:
        encoded = _file_meta_bytes(sop_class_uid, sop_instance_uid, transfer_syntax)
    except UnicodeEncodeError:
        meta = _stock["create_file_meta"](
            sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid, transfer_syntax=transfer_syntax
        )
        return _stock["write_file_meta_info"](fp, meta, *args, **kwargs)
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
