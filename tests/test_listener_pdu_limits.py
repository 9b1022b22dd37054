"""PDU length claims: six bytes must not make the deployed listener hold what they claim.

Over raw sockets against the real listener subprocess; memory is the RSS of its process tree.
"""

from __future__ import annotations

import socket
import struct
import time
from io import BytesIO

import psutil
import pytest
from django.test import Client
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification

from routing.models import OpsCounter
from routing.receive.scp import PDUS_REFUSED_COUNTER
from tests.support.listener_proc import ListenerProcess
from tests.support.net import closed_by_peer

GIB = 1024**3
CLAIMS = 4
MAX_GROWTH = 16 * 1024 * 1024


def tree_rss(listener: ListenerProcess) -> int:
    total = 0
    for pid in listener.pids():
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def pdata_tf(primitive) -> bytes:
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return pdu.encode()


def associate_then_claim(listener: ListenerProcess, length: int) -> socket.socket:
    """An established association (pynetdicom SCU), then a raw P-DATA-TF header claiming `length` bytes."""
    ae = AE(ae_title="PACSLENS_TEST")
    ae.add_requested_context(Verification)
    assoc = ae.associate(listener.host, listener.port, ae_title=listener.ae_title)
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.sendall(pdu_header(0x04, length))
    return raw


class TestPduClaims:
    def test_associate_claims_do_not_grow_the_listener(self, listener_factory):
        listener = listener_factory(env={"PACSLENS_DICOM_SHUTDOWN_GRACE": "1"})
        for _ in range(3):  # warm up: the first associations allocate the listener's steady state
            assert listener.echo() == 0
        before = tree_rss(listener)
        sockets = [socket.create_connection((listener.host, listener.port)) for _ in range(CLAIMS)]
        try:
            for sock in sockets:
                sock.sendall(pdu_header(0x01, GIB))
            time.sleep(2)  # let every association thread read its header (and, unfixed, allocate)
            growth = tree_rss(listener) - before
            assert all(closed_by_peer(sock) for sock in sockets)
        finally:
            for sock in sockets:
                sock.close()
        assert growth < MAX_GROWTH, f"listener grew {growth / 2**20:.1f} MiB on {CLAIMS} claims"
        assert listener.echo() == 0

    def test_pdata_claims_abort_log_and_count(self, listener_factory):
        listener = listener_factory()
        assert listener.echo() == 0
        before = tree_rss(listener)
        sockets = [associate_then_claim(listener, GIB) for _ in range(CLAIMS)]
        time.sleep(2)
        growth = tree_rss(listener) - before
        assert growth < MAX_GROWTH, f"listener grew {growth / 2**20:.1f} MiB on {CLAIMS} claims"
        assert listener.echo() == 0
        assert listener.stop() == 0  # the heartbeat's last flush writes the counters
        counted = listener.query("SELECT label, value FROM routing_opscounter WHERE name = ?", [PDUS_REFUSED_COUNTER])
        assert counted == [{"label": "pdu-too-large", "value": CLAIMS}]
        log = listener.log()
        assert log.count("PDU type 0x04 claims 1073741824 bytes") == CLAIMS
        del sockets

    def test_a_store_cut_off_mid_data_set_leaves_no_temp_file(self, listener_factory):
        listener = listener_factory()
        ae = AE(ae_title="PACSLENS_TEST")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(listener.host, listener.port, ae_title=listener.ae_title)
        assert assoc.is_established
        request = C_STORE()
        request.MessageID, request.Priority = 1, 2
        request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = CTImageStorage, generate_uid()
        request.DataSet = BytesIO(b"\x08\x00\x16\x00UI\x1a\x00" + CTImageStorage.encode() + b"\0" + b"\0" * 200_000)
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        context_id = assoc.accepted_contexts[0].context_id
        pdus = [pdata_tf(p) for p in message.encode_msg(context_id, 16384)]
        raw = assoc.dul.socket.socket
        raw.sendall(b"".join(pdus[: len(pdus) // 2]))  # the command and half the data set
        deadline = time.monotonic() + 10
        while not listener.temp_files() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.temp_files(), "the listener should be receiving into a temp file"
        raw.sendall(pdu_header(0x04, GIB))  # then a claim that aborts the association
        deadline = time.monotonic() + 10
        while listener.temp_files() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.temp_files() == []
        assert listener.echo() == 0


@pytest.mark.django_db
def test_refused_pdus_are_exported_in_metrics():
    OpsCounter.add({(PDUS_REFUSED_COUNTER, "pdu-too-large"): 3, (PDUS_REFUSED_COUNTER, "associate-rq-too-large"): 1})
    body = Client(HTTP_HOST="localhost").get("/metrics").content.decode()
    assert 'pacslens_dicom_pdus_refused_total{reason="pdu-too-large"} 3.0' in body
    assert 'pacslens_dicom_pdus_refused_total{reason="associate-rq-too-large"} 1.0' in body
