"""A flood of idle connections and silent associations against the deployed listener (subprocess).

Times are measured and printed (`-s`), never asserted: the machine may be busy with other suites.
"""

from __future__ import annotations

import socket
import threading
import time

import psutil
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support.listener_proc import DEFAULT_CALLING_AE_TITLES
from tests.test_listener import make_ct

IDLE_CONNECTIONS = 500
SILENT_ASSOCIATIONS = 50
PER_PEER = 4
FLOOD_ADDRESS = "127.0.0.2"  # idle TCP connections
SILENT_ADDRESS = "127.0.0.3"  # associations that never send a DIMSE message
SENDER = DEFAULT_CALLING_AE_TITLES[-1]  # allowed from 127.0.0.1


def test_a_real_sender_is_served_through_a_flood(listener_factory):
    listener = listener_factory(
        env={
            "PACSLENS_DICOM_ACSE_TIMEOUT": "3",
            "PACSLENS_DICOM_NETWORK_TIMEOUT": "600",  # the silent associations stay for the whole test
            "PACSLENS_DICOM_MAX_ASSOCIATIONS_PER_PEER": str(PER_PEER),
        },
        calling_ae_titles=["FLOODER"],
        run=False,
    )
    listener.query_write("UPDATE routing_applicationentity SET host = ? WHERE ae_title = 'FLOODER'", (SILENT_ADDRESS,))
    listener.start()

    started = time.monotonic()
    idle = [_connect(FLOOD_ADDRESS, listener.port) for _ in range(IDLE_CONNECTIONS)]
    silent_ae = AE(ae_title="FLOODER")
    silent_ae.add_requested_context(Verification)
    silent_ae.acse_timeout = silent_ae.network_timeout = 10
    silent = [
        silent_ae.associate("127.0.0.1", listener.port, ae_title="PACSLENS", bind_address=(SILENT_ADDRESS, 0))
        for _ in range(SILENT_ASSOCIATIONS)
    ]
    flood_seconds = time.monotonic() - started
    assert sum(assoc.is_established for assoc in silent) == PER_PEER
    threads_under_flood = psutil.Process(listener.process.pid).num_threads()

    sent_at = time.monotonic()
    sender = AE(ae_title=SENDER)
    sender.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = sender.associate("127.0.0.1", listener.port, ae_title="PACSLENS")
    assert assoc.is_established
    ds = make_ct()
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    served_seconds = time.monotonic() - sent_at

    # The idle connections the listener took are closed by it after the ACSE timeout, unanswered.
    closed = _closed_by_peer(idle, wait=60)
    print(
        f"\nflood: {IDLE_CONNECTIONS} idle + {SILENT_ASSOCIATIONS} silent associations in {flood_seconds:.2f} s; "
        f"listener threads under flood {threads_under_flood}; real sender served in {served_seconds:.3f} s; "
        f"idle connections closed by the listener: {closed}/{IDLE_CONNECTIONS}"
    )
    assert closed == IDLE_CONNECTIONS
    assert threads_under_flood < 4 * (2 * PER_PEER) + 20  # two per open connection, not per flood connection
    for each in silent:
        if each.is_established:
            each.abort()
    for sock in idle:
        sock.close()
    assert [row["sop_instance_uid"] for row in listener.instances()] == [ds.SOPInstanceUID]

    assert listener.stop() == 0  # flushes the in-memory counters
    refused = {
        row["label"]: row["value"]
        for row in listener.query("SELECT label, value FROM routing_opscounter WHERE label LIKE 'refused:%'")
    }
    print(f"refusals counted: {refused}")
    # Not exact: an idle connection closed by the ACSE timeout during the flood frees its slot.
    assert set(refused) == {"refused:peer-connection-limit"}
    assert refused["refused:peer-connection-limit"] >= SILENT_ASSOCIATIONS - PER_PEER + IDLE_CONNECTIONS // 2


def _connect(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def _closed_by_peer(sockets: list[socket.socket], *, wait: float) -> int:
    """How many of `sockets` the other end closed (EOF or reset) within `wait` seconds, all waited on at once."""
    closed = 0
    lock = threading.Lock()

    def read(sock: socket.socket) -> None:
        nonlocal closed
        sock.settimeout(wait)
        try:
            eof = sock.recv(1) == b""
        except ConnectionResetError:
            eof = True
        except OSError:
            eof = False
        if eof:
            with lock:
                closed += 1

    readers = [threading.Thread(target=read, args=(sock,)) for sock in sockets]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    return closed
