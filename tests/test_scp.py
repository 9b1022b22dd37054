"""Our DICOM acceptor (routing.receive.scp) byte by byte: real sockets against an in-process listener.

Each test writes raw PDUs with struct and asserts exactly what comes back on the wire (PDU type,
A-ASSOCIATE-RJ result/source/reason, A-ABORT source/reason, DIMSE response status and Error
Comment), that a refused case stores nothing and leaves nothing in DATA_DIR/incoming, and that
the listener still answers afterwards. Responses are decoded with pynetdicom and pydicom, not
with scp.py's own decoder. The listener closes the connection only after its association thread
has discarded any partial file and closed the association row, so reading to the end of the
connection is how a test waits for that (no timed assertions).
"""

from __future__ import annotations

import resource
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.pdu_primitives import (
    P_DATA,
    AsynchronousOperationsWindowNegotiation,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.sop_class import Verification

from routing.models import Instance, StoreAssociation
from routing.receive.listener import DicomListener
from routing.receive.scp import file_meta_bytes, response_command
from tests.support.ct import make_ct

CALLING = "MODALITY1"
CALLED = "PACSLENS"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
# Message control header (PS3.8 E.2)
DATA_MORE, COMMAND_MORE, DATA_LAST, COMMAND_LAST = 0x00, 0x01, 0x02, 0x03
# A-ABORT source "service provider" and its reasons (PS3.8 9.3.8)
PROVIDER = 0x02
NOT_SPECIFIED, UNRECOGNISED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER = 0x00, 0x01, 0x02, 0x06

# The presentation contexts most tests propose: Verification and CT Image Storage.
ECHO_CONTEXT, CT_CONTEXT = 1, 3
DEFAULT_CONTEXTS = [
    (ECHO_CONTEXT, VERIFICATION, [ImplicitVRLittleEndian]),
    (CT_CONTEXT, CTImageStorage, [ExplicitVRLittleEndian]),
]


# --- PDUs and command sets, by hand ----------------------------------------------------------------


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def associate_rq(
    *,
    calling: str = CALLING,
    called: str = CALLED,
    application_context: str = APPLICATION_CONTEXT,
    contexts: list[tuple[int, str, list[str]]] = DEFAULT_CONTEXTS,
    user_items: bytes = b"",
) -> bytes:
    presentation = b"".join(
        item(
            0x20,
            bytes([context_id, 0, 0, 0])
            + item(0x30, abstract.encode())
            + b"".join(item(0x40, ts.encode()) for ts in syntaxes),
        )
        for context_id, abstract, syntaxes in contexts
    )
    user = item(0x51, struct.pack(">L", 16384)) + item(0x52, b"1.2.826.0.1.3680043.9.9999") + user_items
    body = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + b"\0" * 32
    return pdu(ASSOCIATE_RQ, body + item(0x10, application_context.encode()) + presentation + item(0x50, user))


def role_item(sop_class: str, scu: int, scp: int) -> bytes:
    """SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4)."""
    uid = sop_class.encode()
    return item(0x54, struct.pack(">H", len(uid)) + uid + bytes([scu, scp]))


def window_item(invoked: int, performed: int) -> bytes:
    """Asynchronous Operations Window sub-item (PS3.7 D.3.3.3)."""
    return item(0x53, struct.pack(">HH", invoked, performed))


def pdv(context_id: int, control: int, value: bytes) -> bytes:
    return struct.pack(">LBB", len(value) + 2, context_id, control) + value


def pdata(*pdvs: bytes) -> bytes:
    return pdu(P_DATA_TF, b"".join(pdvs))


RELEASE_RQ_PDU = pdu(RELEASE_RQ, b"\0" * 4)
ABORT_PDU = pdu(ABORT, b"\0\0\0\0")  # source: service user


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def ui(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def command(fields: dict[int, bytes]) -> bytes:
    """A command set, Implicit VR Little Endian, group 0000 with its group length (PS3.7 6.3)."""
    body = b"".join(struct.pack("<HHL", 0, element, len(value)) + value for element, value in sorted(fields.items()))
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1, data_set_type: int = 0x0000) -> bytes:
    return command(
        {
            0x0002: ui(sop_class),
            0x0100: us(0x0001),
            0x0110: us(message_id),
            0x0700: us(0),
            0x0800: us(data_set_type),
            0x1000: ui(sop_instance),
        }
    )


def c_echo_rq(message_id: int = 1) -> bytes:
    return command({0x0002: ui(VERIFICATION), 0x0100: us(0x0030), 0x0110: us(message_id), 0x0800: us(0x0101)})


def data_set(ds: Dataset) -> bytes:
    """The data set as a sender puts it in P-DATA: Explicit VR Little Endian, no file meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def split(data: bytes, sizes: Iterator[int]) -> list[bytes]:
    pieces = []
    offset = 0
    while offset < len(data):
        size = next(sizes)
        pieces.append(data[offset : offset + size])
        offset += size
    return pieces


def odd_sizes() -> Iterator[int]:
    """1-byte fragments first, then a repeating run of odd sizes."""
    yield from [1] * 40
    while True:
        yield from (3, 1, 17, 255, 1, 4097, 7, 1023)


# --- a peer on a raw socket -----------------------------------------------------------------------


class Peer:
    """One TCP connection to the listener, speaking raw PDUs."""

    def __init__(self, listener: DicomListener) -> None:
        self.sock = socket.create_connection(("127.0.0.1", listener.port), timeout=30)

    def close(self) -> None:
        self.sock.close()

    def send(self, *pdus: bytes) -> None:
        self.sock.sendall(b"".join(pdus))

    def pdu(self) -> tuple[int, bytes] | None:
        """The next PDU (type, body), or None when the listener closed the connection."""
        header = self._exact(6)
        if header is None:
            return None
        pdu_type, _, length = struct.unpack(">BBL", header)
        body = self._exact(length)
        assert body is not None, f"connection closed inside a PDU of type 0x{pdu_type:02X}"
        return pdu_type, body

    def _exact(self, count: int) -> bytes | None:
        data = b""
        while len(data) < count:
            try:
                chunk = self.sock.recv(count - len(data))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert not data, "connection closed inside a PDU"
                return None
            data += chunk
        return data

    def closed(self) -> bool:
        """Reads to the end of the connection: True when nothing more came."""
        return self.pdu() is None

    def associate(self, **request) -> A_ASSOCIATE_AC:
        self.send(associate_rq(**request))
        answer = self.pdu()
        assert answer is not None and answer[0] == ASSOCIATE_AC, answer
        ac = A_ASSOCIATE_AC()
        ac.decode(pdu(ASSOCIATE_AC, answer[1]))
        return ac

    def rejected(self, **request) -> tuple[int, int, int]:
        """(result, source, reason) of the A-ASSOCIATE-RJ the request gets; then the connection closes."""
        self.send(associate_rq(**request))
        answer = self.pdu()
        assert answer is not None and answer[0] == ASSOCIATE_RJ, answer
        assert len(answer[1]) == 4 and answer[1][0] == 0
        rj = (answer[1][1], answer[1][2], answer[1][3])
        assert self.closed()
        return rj

    def aborted(self) -> tuple[int, int]:
        """(source, reason) of the A-ABORT that comes next; then the connection closes."""
        answer = self.pdu()
        assert answer is not None and answer[0] == ABORT, answer
        assert len(answer[1]) == 4
        assert self.closed()
        return answer[1][2], answer[1][3]

    def response(self) -> DIMSEMessage:
        """The next DIMSE message, decoded by pynetdicom (command set: pydicom, Implicit VR LE)."""
        message = DIMSEMessage()
        while True:
            answer = self.pdu()
            assert answer is not None and answer[0] == P_DATA_TF, answer
            primitive = P_DATA()
            primitive.presentation_data_value_list = [list(each) for each in pdv_items(answer[1])]
            if message.decode_msg(primitive):
                return message

    def c_store(self, context_id: int, cmd: bytes, body: bytes) -> DIMSEMessage:
        self.send(pdata(pdv(context_id, COMMAND_LAST, cmd)), pdata(pdv(context_id, DATA_LAST, body)))
        return self.response()

    def release(self) -> None:
        self.send(RELEASE_RQ_PDU)
        answer = self.pdu()
        assert answer == (RELEASE_RP, b"\0" * 4)
        assert self.closed()


def pdv_items(body: bytes) -> Iterator[tuple[int, bytes]]:
    """(context id, control header + fragment) per PDV item, as pynetdicom's P_DATA holds them."""
    offset = 0
    while offset < len(body):
        (length,) = struct.unpack_from(">L", body, offset)
        yield body[offset + 4], body[offset + 5 : offset + 4 + length]
        offset += 4 + length
    assert offset == len(body)


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def start_listener(thread_listener_factory) -> Callable[..., DicomListener]:
    """Start an in-process listener after applying `settings` overrides (read at start)."""
    return lambda **overrides: thread_listener_factory(calling=CALLING, ae_title=CALLED, settings_overrides=overrides)


@pytest.fixture
def listener(start_listener) -> DicomListener:
    return start_listener()


@pytest.fixture
def peer(listener) -> Iterator[Peer]:
    connection = Peer(listener)
    yield connection
    connection.close()


def still_serves(listener: DicomListener) -> bool:
    """A C-ECHO from pynetdicom, a different sender than our raw bytes, still gets Success."""
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=CALLED)
    try:
        return bool(assoc.is_established and assoc.send_c_echo().Status == 0x0000)
    finally:
        if assoc.is_established:
            assoc.release()


def nothing_left(data_dir) -> bool:
    return not Instance.objects.exists() and not list((data_dir / "incoming").iterdir())


def incoming_files(data_dir) -> list:
    return list((data_dir / "incoming").iterdir())


def wait_for_partial_file(data_dir) -> None:
    """Until the listener has opened the data set's temporary file (it streams into it)."""
    for _ in range(2000):  # a poll, not a timed assertion: what is asserted is the file
        if incoming_files(data_dir):
            return
        time.sleep(0.005)
    assert incoming_files(data_dir), "the listener never opened a temporary file"


def contexts_by_id(ac: A_ASSOCIATE_AC) -> dict[int, tuple[int, str]]:
    """{context id: (result, transfer syntax)} from an A-ASSOCIATE-AC."""
    primitive = ac.to_primitive()
    return {
        int(cx.context_id): (int(cx.result), str(cx.transfer_syntax[0]) if cx.transfer_syntax else "")
        for cx in primitive.presentation_context_definition_results_list
    }


def user_items(ac: A_ASSOCIATE_AC, kind: type) -> list:
    return [each for each in ac.to_primitive().user_information if isinstance(each, kind)]


# --- association establishment ------------------------------------------------------------------


class TestAssociation:
    def test_accepted_with_our_implementation_and_maximum(self, listener, peer):
        ac = peer.associate()
        assert contexts_by_id(ac) == {
            ECHO_CONTEXT: (0, ImplicitVRLittleEndian),
            CT_CONTEXT: (0, ExplicitVRLittleEndian),
        }
        primitive = ac.to_primitive()
        assert primitive.called_ae_title == CALLED and primitive.calling_ae_title == CALLING
        assert primitive.maximum_length_received == 1024 * 1024
        assert primitive.implementation_class_uid == PYNETDICOM_IMPLEMENTATION_UID
        assert not user_items(ac, AsynchronousOperationsWindowNegotiation)  # only answered when proposed
        peer.release()

    def test_wrong_called_ae_title(self, listener, peer, data_dir):
        assert peer.rejected(called="SOMEONEELSE") == (1, 1, 7)
        assert nothing_left(data_dir)
        assert still_serves(listener)

    def test_wrong_application_context(self, listener, peer, data_dir):
        assert peer.rejected(application_context="1.2.3.4.5") == (1, 1, 2)
        assert nothing_left(data_dir)
        assert still_serves(listener)

    def test_unknown_calling_ae_title(self, listener, peer, data_dir):
        assert peer.rejected(calling="STRANGER") == (1, 1, 3)
        assert nothing_left(data_dir)
        assert not StoreAssociation.objects.exists()
        assert still_serves(listener)

    def test_over_the_association_limit_is_rejected_transiently(self, start_listener, data_dir):
        listener = start_listener(DICOM_MAX_ASSOCIATIONS=1)
        first, second = Peer(listener), Peer(listener)
        try:
            first.associate()
            assert second.rejected() == (2, 3, 2)
            first.release()  # gives its slot back
        finally:
            first.close()
            second.close()
        assert still_serves(listener)
        assert nothing_left(data_dir)

    def test_role_selection_is_answered(self, listener, peer):
        ac = peer.associate(user_items=role_item(CTImageStorage, 1, 0))
        assert contexts_by_id(ac)[CT_CONTEXT][0] == 0
        (role,) = user_items(ac, SCP_SCU_RoleSelectionNegotiation)
        assert (role.sop_class_uid, role.scu_role, role.scp_role) == (CTImageStorage, True, False)
        ct = make_ct()
        assert (
            peer.c_store(CT_CONTEXT, c_store_rq(CTImageStorage, ct.SOPInstanceUID), data_set(ct)).command_set.Status
            == 0
        )
        peer.release()

    def test_role_selection_asking_us_to_be_the_scu_rejects_that_context(self, listener, peer):
        # The requestor would be the SCP only: we never send C-STOREs, so that context cannot work.
        ac = peer.associate(user_items=role_item(CTImageStorage, 0, 1))
        results = contexts_by_id(ac)
        assert results[ECHO_CONTEXT][0] == 0
        assert results[CT_CONTEXT][0] == 1  # user rejection
        peer.release()

    def test_asynchronous_operations_window_is_answered_one_by_one(self, listener, peer):
        ac = peer.associate(user_items=window_item(5, 5))
        (window,) = user_items(ac, AsynchronousOperationsWindowNegotiation)
        assert (window.maximum_number_operations_invoked, window.maximum_number_operations_performed) == (1, 1)
        peer.send(pdata(pdv(ECHO_CONTEXT, COMMAND_LAST, c_echo_rq(7))))
        assert peer.response().command_set.Status == 0
        peer.release()

    def test_rejected_abstract_and_transfer_syntaxes_leave_the_others_accepted(self, listener, peer, data_dir):
        ac = peer.associate(
            contexts=[
                (1, VERIFICATION, [ImplicitVRLittleEndian]),
                (3, "1.2.3.4.5.6.7", [ExplicitVRLittleEndian]),  # no such SOP class
                (5, MRImageStorage, ["1.2.3.4.999"]),  # no such transfer syntax
                (7, CTImageStorage, ["1.2.3.4.999", ExplicitVRLittleEndian]),
            ]
        )
        results = contexts_by_id(ac)
        assert {cid: result for cid, (result, _) in results.items()} == {1: 0, 3: 3, 5: 4, 7: 0}
        assert results[7][1] == ExplicitVRLittleEndian
        ct = make_ct()
        assert peer.c_store(7, c_store_rq(CTImageStorage, ct.SOPInstanceUID), data_set(ct)).command_set.Status == 0
        peer.release()
        assert Instance.objects.filter(sop_instance_uid=ct.SOPInstanceUID).exists()

    def test_p_data_before_association_is_aborted(self, listener, peer, data_dir):
        peer.send(pdata(pdv(1, COMMAND_LAST, c_echo_rq())))
        assert peer.aborted() == (PROVIDER, UNEXPECTED_PDU)
        assert nothing_left(data_dir)
        assert still_serves(listener)

    def test_release_request_before_association_is_aborted(self, listener, peer):
        peer.send(RELEASE_RQ_PDU)
        assert peer.aborted() == (PROVIDER, UNEXPECTED_PDU)

    def test_unknown_pdu_before_association_is_aborted(self, listener, peer):
        peer.send(pdu(0x09, b"\0\0\0\0"))
        assert peer.aborted() == (PROVIDER, UNRECOGNISED_PDU)

    def test_abort_before_association_is_not_answered(self, listener, peer):
        peer.send(ABORT_PDU)
        assert peer.closed()  # PS3.8 9.2 state Sta2, A-ABORT PDU received: AA-2, close
        assert still_serves(listener)

    def test_unsupported_protocol_version(self, listener, peer):
        request = bytearray(associate_rq())
        struct.pack_into(">H", request, 6, 2)  # only bit 0 (version 1) is defined
        peer.send(bytes(request))
        answer = peer.pdu()
        assert answer == (ASSOCIATE_RJ, bytes([0, 2, 2, 2]))
        assert peer.closed()

    def test_silence_before_the_request_is_closed_without_abort(self, start_listener, data_dir):
        listener = start_listener(DICOM_ACSE_TIMEOUT=1.0)
        peer = Peer(listener)
        try:
            assert peer.closed()  # PS3.8 9.2.3: ARTIM expired, no A-ABORT
        finally:
            peer.close()
        assert still_serves(listener)


# --- established: DIMSE --------------------------------------------------------------------------


class TestDimse:
    def test_echo_on_verification(self, listener, peer):
        peer.associate()
        peer.send(pdata(pdv(ECHO_CONTEXT, COMMAND_LAST, c_echo_rq(42))))
        message = peer.response()
        cs = message.command_set
        assert (cs.CommandField, cs.MessageIDBeingRespondedTo, cs.Status) == (0x8030, 42, 0x0000)
        assert cs.AffectedSOPClassUID == VERIFICATION and cs.CommandDataSetType == 0x0101
        assert message.context_id == ECHO_CONTEXT
        assert "ErrorComment" not in cs
        peer.release()

    def test_echo_on_a_storage_context(self, listener, peer):
        peer.associate()
        peer.send(pdata(pdv(CT_CONTEXT, COMMAND_LAST, c_echo_rq(3))))
        cs = peer.response().command_set
        assert (cs.CommandField, cs.MessageIDBeingRespondedTo, cs.Status) == (0x8030, 3, 0x0122)
        peer.release()

    def test_unsupported_command_without_data_set(self, listener, peer):
        peer.associate()
        find = command(
            {0x0002: ui(CTImageStorage), 0x0100: us(0x0020), 0x0110: us(9), 0x0700: us(0), 0x0800: us(0x0101)}
        )
        peer.send(pdata(pdv(CT_CONTEXT, COMMAND_LAST, find)))
        cs = peer.response().command_set
        assert (cs.CommandField, cs.MessageIDBeingRespondedTo, cs.Status) == (0x8020, 9, 0x0211)
        assert cs.AffectedSOPClassUID == CTImageStorage
        assert still_serves(listener)
        peer.release()

    def test_store_without_data_set_cannot_be_understood(self, listener, peer, data_dir):
        peer.associate()
        uid = generate_uid()
        peer.send(pdata(pdv(CT_CONTEXT, COMMAND_LAST, c_store_rq(CTImageStorage, uid, 5, data_set_type=0x0101))))
        cs = peer.response().command_set
        assert (cs.CommandField, cs.MessageIDBeingRespondedTo, cs.Status) == (0x8001, 5, 0xC000)
        assert cs.ErrorComment == "C-STORE-RQ without a data set"
        assert cs.AffectedSOPInstanceUID == uid
        peer.release()
        assert nothing_left(data_dir)

    def test_store_whose_sop_class_differs_from_the_context(self, listener, peer, data_dir):
        peer.associate()
        ct = make_ct()
        cs = peer.c_store(CT_CONTEXT, c_store_rq(MRImageStorage, ct.SOPInstanceUID), data_set(ct)).command_set
        assert (cs.CommandField, cs.Status) == (0x8001, 0x0122)
        assert cs.ErrorComment == "SOP Class differs from the presentation context's"
        assert nothing_left(data_dir)
        peer.release()
        assert nothing_left(data_dir)

    def test_data_without_command_is_aborted(self, listener, peer, data_dir):
        peer.associate()
        peer.send(pdata(pdv(CT_CONTEXT, DATA_LAST, b"\x08\x00\x16\x00UI\x02\x001\0")))
        assert peer.aborted() == (PROVIDER, INVALID_PARAMETER)
        assert nothing_left(data_dir)
        assert still_serves(listener)

    def test_command_split_across_pdvs_and_pdus(self, listener, peer, data_dir):
        peer.associate()
        ct = make_ct()
        cmd = c_store_rq(CTImageStorage, ct.SOPInstanceUID, 11)
        a, b, c, d = cmd[:1], cmd[1:13], cmd[13:50], cmd[50:]
        peer.send(pdata(pdv(CT_CONTEXT, COMMAND_MORE, a), pdv(CT_CONTEXT, COMMAND_MORE, b)))
        peer.send(pdata(pdv(CT_CONTEXT, COMMAND_MORE, c)))
        peer.send(pdata(pdv(CT_CONTEXT, COMMAND_LAST, d), pdv(CT_CONTEXT, DATA_LAST, data_set(ct))))
        cs = peer.response().command_set
        assert (cs.MessageIDBeingRespondedTo, cs.Status) == (11, 0x0000)
        peer.release()
        assert Instance.objects.filter(sop_instance_uid=ct.SOPInstanceUID).exists()

    def test_data_set_in_many_odd_fragments_is_stored_byte_for_byte(self, listener, peer, data_dir):
        peer.associate()
        ct = make_ct()
        ct.Rows = ct.Columns = 64
        ct.PixelData = bytes(range(256)) * 32
        body = data_set(ct)
        pieces = split(body, odd_sizes())
        peer.send(pdata(pdv(CT_CONTEXT, COMMAND_LAST, c_store_rq(CTImageStorage, ct.SOPInstanceUID))))
        # Several PDVs per PDU, and PDUs of different lengths: 1, 2, 3, 1, 2, 3, ... fragments each.
        index, per_pdu = 0, 1
        while index < len(pieces):
            group = pieces[index : index + per_pdu]
            last = index + per_pdu >= len(pieces)
            items = [pdv(CT_CONTEXT, DATA_MORE, piece) for piece in group[:-1]]
            items.append(pdv(CT_CONTEXT, DATA_LAST if last else DATA_MORE, group[-1]))
            peer.send(pdata(*items))
            index += per_pdu
            per_pdu = per_pdu % 3 + 1
        assert peer.response().command_set.Status == 0x0000
        peer.release()
        instance = Instance.objects.get(sop_instance_uid=ct.SOPInstanceUID)
        stored = (data_dir / instance.path).read_bytes()
        meta = file_meta_bytes(CTImageStorage, ct.SOPInstanceUID, ExplicitVRLittleEndian)
        assert stored[: len(meta)] == meta
        assert stored[len(meta) :] == body
        assert not incoming_files(data_dir)


# --- established: broken protocol ----------------------------------------------------------------


class TestProtocolErrors:
    def test_pdv_on_a_context_that_was_not_accepted(self, listener, peer, data_dir):
        ac = peer.associate(
            contexts=[(1, VERIFICATION, [ImplicitVRLittleEndian]), (3, "1.2.3.4.5.6.7", [ImplicitVRLittleEndian])]
        )
        assert contexts_by_id(ac)[3][0] == 3
        peer.send(pdata(pdv(3, COMMAND_LAST, c_echo_rq())))
        assert peer.aborted() == (PROVIDER, INVALID_PARAMETER)
        assert still_serves(listener)

    def test_pdv_on_a_context_never_proposed(self, listener, peer):
        peer.associate()
        peer.send(pdata(pdv(99, COMMAND_LAST, c_echo_rq())))
        assert peer.aborted() == (PROVIDER, INVALID_PARAMETER)

    def test_pdv_longer_than_its_pdu(self, listener, peer, data_dir):
        peer.associate()
        value = bytes([COMMAND_LAST]) + c_echo_rq()
        item_ = struct.pack(">LB", len(value) + 1 + 100, ECHO_CONTEXT) + value
        peer.send(pdu(P_DATA_TF, item_))
        assert peer.aborted() == (PROVIDER, INVALID_PARAMETER)
        assert still_serves(listener)

    def test_command_longer_than_64_kib(self, listener, peer, data_dir):
        peer.associate()
        filler = b"\0" * 16384
        # Four fragments reach 64 KiB exactly, the fifth goes over: aborted before it is read.
        peer.send(*(pdata(pdv(CT_CONTEXT, COMMAND_MORE, filler)) for _ in range(5)))
        assert peer.aborted() == (PROVIDER, INVALID_PARAMETER)
        assert nothing_left(data_dir)
        assert still_serves(listener)

    def test_unknown_pdu_type(self, listener, peer):
        peer.associate()
        peer.send(pdu(0x09, b"\0\0\0\0"))
        assert peer.aborted() == (PROVIDER, UNRECOGNISED_PDU)
        assert still_serves(listener)

    def test_associate_request_after_establishment(self, listener, peer):
        peer.associate()
        peer.send(associate_rq())
        assert peer.aborted() == (PROVIDER, UNEXPECTED_PDU)
        assert still_serves(listener)

    def test_network_timeout_while_established(self, start_listener, data_dir):
        listener = start_listener(DICOM_NETWORK_TIMEOUT=1.0)
        peer = Peer(listener)
        try:
            peer.associate()
            assert peer.aborted() == (PROVIDER, NOT_SPECIFIED)
        finally:
            peer.close()
        assert still_serves(listener)


# --- endings mid data set ------------------------------------------------------------------------


def store_one_then_start_another(peer: Peer, data_dir) -> tuple[str, str]:
    """One instance stored (so the association has its row), then a second one's command and part
    of its data set, its temporary file open. Returns both SOP Instance UIDs."""
    peer.associate()
    first, second = make_ct(), make_ct()
    assert (
        peer.c_store(CT_CONTEXT, c_store_rq(CTImageStorage, first.SOPInstanceUID), data_set(first)).command_set.Status
        == 0
    )
    body = data_set(second)
    peer.send(
        pdata(pdv(CT_CONTEXT, COMMAND_LAST, c_store_rq(CTImageStorage, second.SOPInstanceUID, 2))),
        pdata(pdv(CT_CONTEXT, DATA_MORE, body[: len(body) // 2])),
    )
    wait_for_partial_file(data_dir)
    return first.SOPInstanceUID, second.SOPInstanceUID


class TestEndingsMidDataSet:
    def test_release_mid_data_set(self, listener, peer, data_dir):
        first, second = store_one_then_start_another(peer, data_dir)
        peer.release()  # RP, then the connection closes: the thread has finished
        assert not incoming_files(data_dir)
        assert list(Instance.objects.values_list("sop_instance_uid", flat=True)) == [first]
        row = StoreAssociation.objects.get()
        assert row.ended_at is not None
        assert row.released_normally
        assert row.instances_received == 1
        assert still_serves(listener)

    def test_peer_abort_mid_data_set(self, listener, peer, data_dir):
        first, second = store_one_then_start_another(peer, data_dir)
        peer.send(ABORT_PDU)
        assert peer.closed()  # nothing answers an A-ABORT
        assert not incoming_files(data_dir)
        assert list(Instance.objects.values_list("sop_instance_uid", flat=True)) == [first]
        row = StoreAssociation.objects.get()
        assert row.ended_at is not None
        assert not row.released_normally
        assert row.instances_received == 1
        assert still_serves(listener)

    def test_data_set_stalled_past_the_dimse_timeout(self, start_listener, data_dir):
        listener = start_listener(DICOM_DIMSE_TIMEOUT=1.0)
        peer = Peer(listener)
        try:
            store_one_then_start_another(peer, data_dir)  # and then nothing more of its data set
            assert peer.aborted() == (PROVIDER, NOT_SPECIFIED)
        finally:
            peer.close()
        assert not incoming_files(data_dir)
        row = StoreAssociation.objects.get()
        assert row.ended_at is not None and not row.released_normally
        assert still_serves(listener)


# --- a receive that cannot be written -------------------------------------------------------------


class TestWriteFailures:
    def test_write_failing_mid_receive_drains_and_answers_out_of_resources(self, listener, peer, data_dir, caplog):
        # A file size limit (RLIMIT_FSIZE, no privileges needed; Python ignores SIGXFSZ) makes
        # the temporary file's writes fail with EFBIG part way through, as a full disk would.
        ct = make_ct()
        ct.Rows = ct.Columns = 1024
        ct.PixelData = b"\x01\x00" * (1024 * 1024)  # 2 MiB
        body = data_set(ct)
        peer.associate()
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, hard))
        try:
            pieces = split(body, iter(lambda: 65536, None))
            peer.send(pdata(pdv(CT_CONTEXT, COMMAND_LAST, c_store_rq(CTImageStorage, ct.SOPInstanceUID, 4))))
            for piece in pieces[:-1]:
                peer.send(pdata(pdv(CT_CONTEXT, DATA_MORE, piece)))
            peer.send(pdata(pdv(CT_CONTEXT, DATA_LAST, pieces[-1])))
            cs = peer.response().command_set
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert (cs.CommandField, cs.MessageIDBeingRespondedTo, cs.Status) == (0x8001, 4, 0xA700)
        assert cs.ErrorComment == "Out of resources: the data set could not be written"
        assert "File too large" in caplog.text  # a write failed, not the file's creation
        assert nothing_left(data_dir)
        # The rest of the data set was read: the association goes on in step.
        again = make_ct()
        assert (
            peer.c_store(
                CT_CONTEXT, c_store_rq(CTImageStorage, again.SOPInstanceUID), data_set(again)
            ).command_set.Status
            == 0
        )
        peer.release()

    def test_temporary_file_that_cannot_be_created(self, listener, peer, data_dir):
        # Running as root ignores a read-only directory, so make DATA_DIR/incoming not a directory.
        incoming = data_dir / "incoming"
        peer.associate()
        incoming.rmdir()
        incoming.write_bytes(b"")
        try:
            ct = make_ct()
            cs = peer.c_store(CT_CONTEXT, c_store_rq(CTImageStorage, ct.SOPInstanceUID), data_set(ct)).command_set
        finally:
            incoming.unlink()
            incoming.mkdir()
        assert cs.Status == 0xA700
        assert nothing_left(data_dir)
        assert still_serves(listener)
        peer.release()


# --- encoders against pydicom and pynetdicom -----------------------------------------------------


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "transfer_syntax"),
    [
        (CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian),  # even lengths
        (MRImageStorage, "1.2.3.45", ImplicitVRLittleEndian),  # odd lengths: padded
        ("1.2.840.10008.5.1.4.1.1.88.22", generate_uid(), "1.2.840.10008.1.2.4.50"),
    ],
)
def test_file_meta_is_what_pydicom_writes(sop_class, sop_instance, transfer_syntax):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    assert file_meta_bytes(sop_class, sop_instance, transfer_syntax) == buffer.getvalue()


@pytest.mark.parametrize(
    ("status", "comment", "expected_comment"),
    [
        (0x0000, "", None),
        (
            0xA700,
            "Out of resources: the data set could not be written",
            "Out of resources: the data set could not be written",
        ),
        (0xC000, "odd", "odd"),  # padded with a space, which decoding strips
        (0xA900, "back\\slash and \x07 bell and é" + "x" * 80, ("back slash and   bell and  " + "x" * 80)[:64]),
    ],
)
def test_store_response_decodes_as_intended(status, comment, expected_comment):
    uid = generate_uid()
    encoded = response_command(0x8001, CTImageStorage, uid, 0xBEEF, status, comment)
    message = DIMSEMessage()
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[5, bytes([COMMAND_LAST]) + encoded]]
    assert message.decode_msg(primitive)
    assert type(message).__name__ == "C_STORE_RSP"
    assert message.command_set.CommandGroupLength == len(encoded) - 12
    rsp = message.message_to_primitive()
    assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (0xBEEF, status)
    assert (rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID) == (CTImageStorage, uid)
    assert rsp.ErrorComment == expected_comment
    assert len(encoded) % 2 == 0


def test_echo_response_decodes_as_intended():
    encoded = response_command(0x8030, VERIFICATION, None, 1, 0x0000)
    message = DIMSEMessage()
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[1, bytes([COMMAND_LAST]) + encoded]]
    assert message.decode_msg(primitive)
    assert type(message).__name__ == "C_ECHO_RSP"
    assert "AffectedSOPInstanceUID" not in message.command_set
    rsp = message.message_to_primitive()
    assert (rsp.MessageIDBeingRespondedTo, rsp.Status, rsp.AffectedSOPClassUID) == (1, 0, VERIFICATION)
    assert message.command_set.CommandGroupLength == len(encoded) - 12
