"""C-STORE SCU against real peers: Orthanc, and pynetdicom SCPs that answer what we tell them."""

from __future__ import annotations

import socket
import threading

import pytest
from pynetdicom.sop_class import CTImageStorage

from results.deliver.dicom_send import StoreSession, send_datasets
from results.deliver.payload import OutcomeKind, Protocol
from results.deliver.sr import build_sr
from tests.support.ct import make_ct_slices
from tests.support.dicom_files import part10_bytes
from tests.support.dicom_peers import SCP_AE, StubSCP
from tests.support.identities import identity
from tests.support.net import free_port
from tests.support.sr import assert_orthanc_holds_the_sr, make_payload

CALLING_AE = "PACSLENS"

pytestmark = pytest.mark.interop


@pytest.fixture
def study_and_sr():
    sources = make_ct_slices(3)
    payload = make_payload(sources)
    return sources, payload, build_sr(payload)


def send(scp: StubSCP, datasets, **kwargs):
    return send_datasets(
        kwargs.pop("calling", CALLING_AE), "127.0.0.1", scp.port, kwargs.pop("called", SCP_AE), datasets, **kwargs
    )


# --- Orthanc ---------------------------------------------------------------------------------


def test_it_stores_the_sr_in_the_source_study_at_orthanc(orthanc, study_and_sr):
    sources, payload, sr = study_and_sr
    orthanc.clear()
    for ds in sources:
        orthanc.upload(part10_bytes(ds))

    (outcome,) = send_datasets(CALLING_AE, orthanc.host, orthanc.dicom_port, orthanc.aet, [sr])

    assert outcome.kind is OutcomeKind.SUCCESS, outcome.describe()
    assert (outcome.protocol, outcome.code, outcome.key) == (Protocol.DICOM, 0, sr.SOPInstanceUID)
    assert_orthanc_holds_the_sr(orthanc, sources, payload)


def test_a_re_send_leaves_one_copy_at_orthanc(orthanc, study_and_sr):
    sources, payload, sr = study_and_sr
    orthanc.clear()
    for ds in sources:
        orthanc.upload(part10_bytes(ds))

    first = send_datasets(CALLING_AE, orthanc.host, orthanc.dicom_port, orthanc.aet, [sr])
    # A re-send builds the SR again from the same result, as the ledger will after a crash.
    again = send_datasets(CALLING_AE, orthanc.host, orthanc.dicom_port, orthanc.aet, [build_sr(payload)])

    assert first[0].ok and again[0].ok
    matches = orthanc.find_instances({"SOPInstanceUID": str(payload.sr_sop_instance_uid)})
    assert len(matches) == 1
    assert orthanc.instance_count() == len(sources) + 1


def test_a_session_reuses_one_association_with_tcp_nodelay(orthanc):
    sources = make_ct_slices(2)
    srs = [build_sr(make_payload(sources, identity=identity(f"result-r{n}"))) for n in range(3)]

    with StoreSession(
        calling_ae_title=CALLING_AE, host=orthanc.host, port=orthanc.dicom_port, called_ae_title=orthanc.aet
    ) as session:
        sock = session._assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        outcomes = [session.store(sr) for sr in srs]
        assert session._assoc.dul.socket.socket is sock, "one association for all stores"

    assert [outcome.kind for outcome in outcomes] == [OutcomeKind.SUCCESS] * 3
    for sr in srs:
        assert len(orthanc.find_instances({"SOPInstanceUID": str(sr.SOPInstanceUID)})) == 1


def test_a_session_reconnects_when_the_peer_dropped_the_association(scp_factory):
    sources = make_ct_slices(1)
    srs = [build_sr(make_payload(sources, identity=identity(f"result-d{n}"))) for n in range(3)]
    scp = scp_factory(drop_after_store=True)
    with StoreSession(calling_ae_title=CALLING_AE, host="127.0.0.1", port=scp.port, called_ae_title=SCP_AE) as session:
        outcomes = []
        for sr in srs:
            outcomes.append(session.store(sr))
            # Wait until the SCP's abort has arrived, so the next store finds a dead association.
            if session._assoc is not None:
                session._assoc.join(timeout=10)
    assert [outcome.kind for outcome in outcomes] == [OutcomeKind.SUCCESS] * 3
    assert scp.received == [str(sr.SOPInstanceUID) for sr in srs]


# --- Association failures ---------------------------------------------------------------------


def test_an_unknown_calling_ae_is_a_config_error_not_retried(scp_factory, study_and_sr):
    scp = scp_factory(require_calling_aet=["SOMEONE"])
    (outcome,) = send(scp, [study_and_sr[2]])
    assert outcome.kind is OutcomeKind.CONFIG_ERROR
    assert not outcome.retryable
    assert outcome.code == "A-ASSOCIATE-RJ 1/1/3"
    assert outcome.key == study_and_sr[2].SOPInstanceUID
    assert scp.received == []


def test_an_unknown_called_ae_is_a_config_error(scp_factory, study_and_sr):
    scp = scp_factory(require_called_aet=True)
    (outcome,) = send(scp, [study_and_sr[2]], called="WRONGAE")
    assert outcome.kind is OutcomeKind.CONFIG_ERROR
    assert outcome.code == "A-ASSOCIATE-RJ 1/1/7"


def test_too_many_associations_is_transient(scp_factory, study_and_sr):
    scp = scp_factory(max_associations=1)
    with StoreSession(calling_ae_title=CALLING_AE, host="127.0.0.1", port=scp.port, called_ae_title=SCP_AE):
        (outcome,) = send(scp, [study_and_sr[2]])
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.code == "A-ASSOCIATE-RJ 2/3/2"


def test_a_peer_that_is_down_is_transient(study_and_sr):
    port = free_port()  # nobody listens here
    outcomes = send_datasets(CALLING_AE, "127.0.0.1", port, SCP_AE, [study_and_sr[2]], timeout=2)
    assert [outcome.kind for outcome in outcomes] == [OutcomeKind.TRANSIENT]
    assert outcomes[0].code is None


def test_an_unsupported_sop_class_is_permanent(scp_factory, study_and_sr):
    scp = scp_factory(sop_classes=(CTImageStorage,))
    (outcome,) = send(scp, [study_and_sr[2]])
    assert outcome.kind is OutcomeKind.PERMANENT


def test_no_response_is_transient(scp_factory, study_and_sr):
    scp = scp_factory(reply_delay=threading.Event())
    (outcome,) = send(scp, [study_and_sr[2]], timeout=1)
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.code is None


# --- DIMSE statuses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (0xA700, OutcomeKind.TRANSIENT),
        (0xA7FF, OutcomeKind.TRANSIENT),
        (0xA900, OutcomeKind.PERMANENT),
        (0xC000, OutcomeKind.PERMANENT),
        (0x0122, OutcomeKind.PERMANENT),
        (0x0124, OutcomeKind.CONFIG_ERROR),
        (0x0110, OutcomeKind.TRANSIENT),
    ],
)
def test_failure_statuses_are_classified(scp_factory, study_and_sr, status, kind):
    scp = scp_factory(status=status)
    (outcome,) = send(scp, [study_and_sr[2]])
    assert (outcome.kind, outcome.code) == (kind, status)
    assert f"0x{status:04X}" in outcome.describe()


def test_a_warning_is_a_success_with_a_note(scp_factory, study_and_sr):
    scp = scp_factory(status=0xB000)
    (outcome,) = send(scp, [study_and_sr[2]])
    assert outcome.ok
    assert outcome.warning.startswith("status 0xB000")


def test_outcomes_come_back_per_dataset_in_order(scp_factory):
    sources = make_ct_slices(1, patient_name="Doe^Jane")
    srs = [build_sr(make_payload(sources, identity=identity(f"result-o{n}"))) for n in range(3)]
    scp = scp_factory(status=0xA900)
    outcomes = send(scp, srs)
    assert [outcome.key for outcome in outcomes] == [str(sr.SOPInstanceUID) for sr in srs]
    assert scp.received == [str(sr.SOPInstanceUID) for sr in srs]
    assert all("Doe" not in outcome.describe() for outcome in outcomes)
