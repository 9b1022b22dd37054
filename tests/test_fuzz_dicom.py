"""Fuzzing the DICOM listener: malformed data sets by C-STORE and malformed PDUs over raw sockets.

One subprocess listener, a fixed seed and a fixed budget (about 40 s on a busy 2-core machine).
Every case must end in a DICOM failure status, an A-ASSOCIATE-RJ, an A-ABORT or a closed
connection; nothing of a refused case may be stored or left in DATA_DIR/incoming; afterwards
the listener still answers C-ECHO and its memory has not grown much.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

from routing.store.header import VRS
from tests.support.ct import make_ct
from tests.support.listener_proc import ListenerProcess

SEED = 20261129
CASES_PER_MUTATION = 20
MAX_RSS_GROWTH = 64 * 1024 * 1024
FAILURE_STATUSES = range(0xA000, 0xD000)  # Refused (Axxx), Error (Cxxx), Failure classes of PS3.7 C
CALLING = "PACSLENS_TEST"
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = b"1.2.840.10008.1.1"


@pytest.fixture
def send_files_raw(monkeypatch):
    # Stream our crafted files as they are: the request UIDs come from the file meta.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def test_fuzzed_input_is_refused_and_the_listener_survives(listener_factory, send_files_raw, tmp_path):
    rng = random.Random(SEED)
    # A connection refused before its A-ASSOCIATE-RQ holds its thread until the ACSE timeout
    # (pynetdicom, stock or patched): do not let teardown wait for those.
    listener = listener_factory(env={"PACSLENS_DICOM_SHUTDOWN_GRACE": "1"})
    for _ in range(3):
        assert listener.echo() == 0
    rss_before = tree_rss(listener)
    counts: Counter[str] = Counter()
    refused_uids = []

    for mutation in DATA_SET_MUTATIONS:
        for _ in range(CASES_PER_MUTATION):
            uid = generate_uid()
            path = part10(tmp_path, mutation(rng, top_level_elements(make_ct(sop_uid=uid))), uid)
            outcome = c_store(listener, path)
            counts["tried"] += 1
            counts["stored" if outcome == "stored" else "refused"] += 1
            assert outcome != "stored", f"{mutation.__name__} case stored"
            refused_uids.append(uid)

    for case in PDU_CASES:
        for payload in case(rng):
            outcome = raw_exchange(listener, payload)
            counts["tried"] += 1
            counts["accepted" if outcome == "accepted" else "refused"] += 1
            assert outcome in ("rejected", "aborted", "closed", "accepted"), f"{case.__name__}: {outcome}"

    assert listener.echo() == 0
    stored = listener.query(
        f"SELECT sop_instance_uid FROM routing_instance WHERE sop_instance_uid IN ({','.join('?' * len(refused_uids))})",
        refused_uids,
    )
    assert stored == []
    deadline = time.monotonic() + 10
    while listener.temp_files() and time.monotonic() < deadline:
        time.sleep(0.1)  # an association's thread may still be ending
    assert listener.temp_files() == []
    growth = tree_rss(listener) - rss_before
    assert growth < MAX_RSS_GROWTH, f"listener grew {growth / 2**20:.1f} MiB over {counts['tried']} cases"
    assert counts["accepted"] <= 2  # only the well-formed 128-context requests


# --- data sets ------------------------------------------------------------------------------------

Element = tuple[int, bytes]  # (tag, encoded element, explicit VR little endian)


def top_level_elements(ds: Dataset) -> list[Element]:
    elements = []
    correct_ambiguous_vr(ds, True)
    for elem in ds:
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_data_element(buf, elem)
        elements.append((int(elem.tag), buf.getvalue()))
    return elements


def body(elements: list[Element]) -> bytes:
    return b"".join(encoded for _, encoded in elements)


def truncated(rng: random.Random, elements: list[Element]) -> bytes:
    data = body(elements)
    return data[: rng.randrange(1, len(data))]


def random_bytes_after_sop_uids(rng: random.Random, elements: list[Element]) -> bytes:
    index = next(i for i, (tag, _) in enumerate(elements) if tag == 0x00080018) + 1
    noise = rng.randbytes(rng.randrange(1, 64))
    return body(elements[:index]) + noise + body(elements[index:])


def absurd_length(rng: random.Random, elements: list[Element]) -> bytes:
    index = rng.randrange(len(elements))
    tag, encoded = elements[index]
    if encoded[4:6] in (b"OB", b"OW", b"OF", b"SQ", b"UN", b"UT", b"UC", b"UR"):
        length = struct.pack("<I", rng.choice([0xFFFFFFF0, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 30]))
        encoded = encoded[:8] + length + encoded[12:]
    else:
        encoded = encoded[:6] + struct.pack("<H", rng.choice([0xFFFF, 0xFFFE, 0x8001])) + encoded[8:]
    return body([*elements[:index], (tag, encoded), *elements[index + 1 :]])


def deep_sequence(rng: random.Random, elements: list[Element]) -> bytes:
    depth = 1000
    opening = (
        struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    ) * depth
    closing = (struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)) * depth
    index = next(i for i, (tag, _) in enumerate(elements) if tag > 0x00081140)
    if rng.random() < 0.5:
        closing = closing[: len(closing) // 2]  # and unbalanced
    return body(elements[:index]) + opening + closing + body(elements[index:])


def wrong_vr(rng: random.Random, elements: list[Element]) -> bytes:
    index = rng.randrange(len(elements))
    tag, encoded = elements[index]
    while True:
        vr = bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(2))
        if vr not in VRS:
            break
    return body([*elements[:index], (tag, encoded[:4] + vr + encoded[6:]), *elements[index + 1 :]])


DATA_SET_MUTATIONS: list[Callable[[random.Random, list[Element]], bytes]] = [
    truncated,
    random_bytes_after_sop_uids,
    absurd_length,
    deep_sequence,
    wrong_vr,
]


def part10(folder: Path, data_set: bytes, uid: str) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"{uid}.dcm"
    with path.open("wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, meta)
        fh.write(data_set)
    return path


def c_store(listener: ListenerProcess, path: Path) -> str:
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate(listener.host, listener.port, ae_title=listener.ae_title)
    assert assoc.is_established
    try:
        response = assoc.send_c_store(path)
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in response:
        return "aborted"
    status = int(response.Status)
    if status == 0x0000:
        return "stored"
    assert status in FAILURE_STATUSES, hex(status)
    return "failure status"


# --- PDUs -------------------------------------------------------------------------------------------


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(contexts: list[tuple[int, bytes, list[bytes]]], calling: bytes = CALLING.encode()) -> bytes:
    presentation = b"".join(
        item(0x20, bytes([context_id, 0, 0, 0]) + item(0x30, abstract) + b"".join(item(0x40, ts) for ts in syntaxes))
        for context_id, abstract, syntaxes in contexts
    )
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.826.0.1.3680043.9.9999"))
    pdu = struct.pack(">HH", 1, 0) + b"PACSLENS".ljust(16) + calling.ljust(16) + b"\0" * 32
    pdu += item(0x10, APPLICATION_CONTEXT) + presentation + user
    return struct.pack(">BBI", 0x01, 0, len(pdu)) + pdu


def good_associate_rq() -> bytes:
    return associate_rq([(1, VERIFICATION, [b"1.2.840.10008.1.2"])])


def bad_lengths(rng: random.Random) -> list[list[bytes]]:
    cases = []
    for _ in range(4):
        pdu = bytearray(good_associate_rq())
        struct.pack_into(">I", pdu, 2, rng.choice([0, 3, len(pdu) * 2, rng.randrange(0, 70000)]))
        cases.append([bytes(pdu)])
    for _ in range(3):  # an item whose length runs past the PDU
        pdu = bytearray(good_associate_rq())
        struct.pack_into(">H", pdu, 76, rng.randrange(300, 0xFFFF))
        cases.append([bytes(pdu)])
    return cases


def unknown_pdu_types(rng: random.Random) -> list[list[bytes]]:
    types = [0x00, 0x08, 0xFF, *rng.sample(range(0x09, 0xFF), 3)]
    return [[struct.pack(">BBI", t, 0, 4) + b"\0" * 4] for t in types]


def out_of_order(rng: random.Random) -> list[list[bytes]]:
    pdata = struct.pack(">BBI", 0x04, 0, 10) + struct.pack(">IB", 6, 1) + b"\x03\x00\x00\x00\x00"
    release = struct.pack(">BBI", 0x05, 0, 4) + b"\0" * 4
    accept = struct.pack(">BBI", 0x02, 0, 4) + b"\0" * 4
    return [[pdata], [release], [accept], [good_associate_rq(), good_associate_rq()], [good_associate_rq(), accept]]


def many_presentation_contexts(rng: random.Random) -> list[list[bytes]]:
    syntaxes = [b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.1", b"1.2.840.10008.1.2.4.50"]
    contexts = [(2 * i + 1, b"1.2.840.10008.5.1.4.1.1.2", syntaxes) for i in range(128)]
    duplicated_ids = [(1, b"1.2.840.10008.5.1.4.1.1.2", syntaxes) for _ in range(128)]
    return [[associate_rq(contexts)], [associate_rq(duplicated_ids)], [associate_rq(contexts, calling=b"NOT_ALLOWED")]]


PDU_CASES: list[Callable[[random.Random], list[list[bytes]]]] = [
    bad_lengths,
    unknown_pdu_types,
    out_of_order,
    many_presentation_contexts,
]


def raw_exchange(listener: ListenerProcess, pdus: list[bytes]) -> str:
    """Send `pdus`, half-close, and say how the listener answered: rejected, aborted, closed or accepted."""
    with socket.create_connection((listener.host, listener.port), timeout=15) as sock:
        answers = []
        for pdu in pdus:
            try:
                sock.sendall(pdu)
            except OSError:
                break
        try:
            sock.shutdown(socket.SHUT_WR)  # a PDU claiming more than we sent then ends at our EOF
        except OSError:
            pass
        try:
            while True:
                header = sock.recv(6)
                if len(header) < 6:
                    break
                pdu_type, _, length = struct.unpack(">BBI", header)
                answers.append(pdu_type)
                remaining = length
                while remaining > 0:
                    chunk = sock.recv(min(remaining, 65536))
                    if not chunk:
                        break
                    remaining -= len(chunk)
        except ConnectionResetError:
            pass
    if 0x03 in answers:
        return "rejected"
    if 0x07 in answers:
        return "aborted"
    if answers == [0x02]:
        return "accepted"  # and then closed when we half-closed: a well-formed request
    return "closed" if not answers else f"answered {answers}"


def tree_rss(listener: ListenerProcess) -> int:
    total = 0
    for pid in listener.pids():
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total
