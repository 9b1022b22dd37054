"""DICOM TLS over real sockets: dcmtk `echoscu`/`storescu` against our listener, our SCUs against
dcmtk `storescp`, and the handshakes that must fail (plain TCP on the TLS port, an untrusted or
missing client certificate, TLS 1.0/1.1). The certificates are made here with the openssl CLI.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pacslens.ops.probes import probe_dicom_echo
from pacslens.settings import envfile
from results.deliver.dicom_send import StoreSession
from results.deliver.payload import OutcomeKind
from results.deliver.senders import _send_dicom
from results.deliver.sr import build_sr
from results.models import Destination
from routing.models import ApplicationEntity, Instance
from routing.receive import dicom_tls
from tests.support.certs import Pair, ca_make, leaf_make
from tests.support.ct import ct_series_write, make_ct_slices
from tests.support.listener_proc import dcmtk_env
from tests.support.net import closed_by_peer, free_port, require_program
from tests.support.sr import make_payload

pytestmark = pytest.mark.interop

CALLING = "TLSMODALITY"
STORESCP_AE = "STORESCP"


@dataclass
class Certificates:
    ca: Path
    server: Pair  # our certificate: listener, and client certificate of our SCUs
    client: Pair  # a modality's, signed by our CA
    other_ca: Path
    untrusted_client: Pair  # signed by another CA
    untrusted_server: Pair  # signed by another CA


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certificates:
    folder = tmp_path_factory.mktemp("tls")
    ca, other = ca_make(folder, "hospital-ca"), ca_make(folder, "other-ca")
    return Certificates(
        ca=ca.cert,
        server=leaf_make(folder, "pacslens", ca),
        client=leaf_make(folder, "modality", ca),
        other_ca=other.cert,
        untrusted_client=leaf_make(folder, "stranger", other),
        untrusted_server=leaf_make(folder, "rogue-pacs", other),
    )


@pytest.fixture
def tls_settings(settings, certs):
    settings.DICOM_TLS_CERT = certs.server.cert
    settings.DICOM_TLS_KEY = certs.server.key
    settings.DICOM_TLS_CA = certs.ca
    settings.DICOM_TLS_REQUIRE_CLIENT_CERT = True
    settings.DICOM_TLS_CHECK_HOSTNAME = False
    return settings


@pytest.fixture
def listener_in_thread(thread_listener_factory, tls_settings):
    # Made now, not at start: some tests bind the AE title to a certificate name first.
    ApplicationEntity.objects.create(ae_title=CALLING, host="127.0.0.1", may_send=True)
    return lambda tls_mode: thread_listener_factory(calling=CALLING, tls_mode=tls_mode, tls_port=0)


def dcmtk(program: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_program(program), *args], env=dcmtk_env(), capture_output=True, text=True, check=False, timeout=60
    )


def echoscu(port: int, *tls: str) -> subprocess.CompletedProcess:
    return dcmtk("echoscu", "-aet", CALLING, "-aec", "PACSLENS", *tls, "127.0.0.1", str(port))


def with_cert(pair: Pair, ca: Path) -> tuple[str, ...]:
    return ("+tls", str(pair.key), str(pair.cert), "+cf", str(ca))


# --- dcmtk SCUs against our listener ---------------------------------------------------------------


def test_echoscu_and_storescu_with_a_trusted_certificate_work(listener_in_thread, certs, tmp_path):
    listener = listener_in_thread("tls")
    assert echoscu(listener.port, *with_cert(certs.client, certs.ca)).returncode == 0
    files = ct_series_write(tmp_path / "ct", 3, rows=16, columns=16)
    result = dcmtk(
        "storescu",
        "-aet",
        CALLING,
        "-aec",
        "PACSLENS",
        *with_cert(certs.client, certs.ca),
        "127.0.0.1",
        str(listener.port),
        *map(str, files),
    )
    assert result.returncode == 0, result.stderr
    assert Instance.objects.count() == 3


def test_a_plain_connection_to_the_tls_port_fails(listener_in_thread):
    listener = listener_in_thread("tls")
    assert echoscu(listener.port).returncode != 0
    assert not plain_associate(listener.port).is_established


def test_a_silent_connection_does_not_hold_up_the_others(listener_in_thread, certs):
    listener = listener_in_thread("tls")
    # pynetdicom would handshake in the accepting thread; ours does it in the association's.
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10):
        assert echoscu(listener.port, *with_cert(certs.client, certs.ca)).returncode == 0


def test_connections_waiting_for_their_handshake_count_toward_the_peer_limit(listener_in_thread, settings):
    settings.DICOM_MAX_ASSOCIATIONS_PER_PEER = 2
    listener = listener_in_thread("tls")
    silent = [socket.create_connection(("127.0.0.1", listener.port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.5)  # both accepted, their threads waiting for a ClientHello
        with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as third:
            assert closed_by_peer(third, timeout=5), "a third connection from the same peer must be closed at once"
    finally:
        for sock in silent:
            sock.close()


# A failed handshake ends its thread cleanly (it once raised while closing the connection).
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_untrusted_client_certificate_is_refused(listener_in_thread, certs, caplog):
    listener = listener_in_thread("tls")
    # The client trusts our CA, so only our side can be refusing.
    assert echoscu(listener.port, *with_cert(certs.untrusted_client, certs.ca)).returncode != 0
    assert "refusing TLS connection from 127.0.0.1: CERTIFICATE_VERIFY_FAILED" in caplog.text


def test_a_client_without_certificate_is_refused(listener_in_thread, certs, caplog):
    listener = listener_in_thread("tls")
    assert echoscu(listener.port, "+tla", "+cf", str(certs.ca)).returncode != 0
    assert "refusing TLS connection from 127.0.0.1: PEER_DID_NOT_RETURN_A_CERTIFICATE" in caplog.text


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["1.0", "1.1"])
def test_tls_1_0_and_1_1_are_refused(listener_in_thread, certs, version):
    listener = listener_in_thread("tls")
    # dcmtk cannot be made to offer TLS < 1.2, and Debian's OpenSSL refuses it at its default
    # security level: a Python client at SECLEVEL 0 capped at `version` really offers it, so
    # the failure below is our listener's refusal (NO_PROTOCOLS_AVAILABLE would be the client's).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=str(certs.ca))
    context.load_cert_chain(str(certs.client.cert), str(certs.client.key))
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = version
    context.maximum_version = version
    with (
        socket.create_connection(("127.0.0.1", listener.port), timeout=10) as raw,
        pytest.raises(ssl.SSLError) as refused,
    ):
        context.wrap_socket(raw, server_hostname="127.0.0.1")
    assert "NO_PROTOCOLS_AVAILABLE" not in str(refused.value)


def test_both_mode_serves_plain_and_tls_ports(listener_in_thread, certs):
    listener = listener_in_thread("both")
    assert listener.tls_port != listener.port
    assert echoscu(listener.port).returncode == 0
    assert echoscu(listener.tls_port, *with_cert(certs.client, certs.ca)).returncode == 0
    assert echoscu(listener.tls_port).returncode != 0


def test_our_echo_probe_uses_tls(listener_in_thread):
    listener = listener_in_thread("tls")
    # Our SCU presents our certificate (signed by the CA the listener trusts) and verifies the listener's.
    result = probe_dicom_echo(
        host="127.0.0.1", port=listener.port, called_ae_title="PACSLENS", calling_ae_title=CALLING, tls=True
    )
    assert result.ok, result
    assert not probe_dicom_echo(
        host="127.0.0.1", port=listener.port, called_ae_title="PACSLENS", calling_ae_title=CALLING, tls=False
    ).ok


def test_the_echo_probe_says_when_the_tls_handshake_fails(tls_settings, storescp, certs):
    peer = storescp(certs.untrusted_server, certs.ca)
    result = probe_dicom_echo(host="127.0.0.1", port=peer.port, called_ae_title=STORESCP_AE, tls=True)
    assert not result.ok
    assert result.summary == "TLS handshake failed"
    assert "CERTIFICATE_VERIFY_FAILED" in result.reason


def test_the_deployed_listener_serves_both_ports_from_every_process(listener_factory, certs):
    tls_port = free_port()
    proc = listener_factory(
        processes=2,
        calling_ae_titles=[CALLING],
        env={
            "PACSLENS_DICOM_TLS_MODE": "both",
            "PACSLENS_DICOM_TLS_PORT": str(tls_port),
            "PACSLENS_DICOM_TLS_CERT": str(certs.server.cert),
            "PACSLENS_DICOM_TLS_KEY": str(certs.server.key),
            "PACSLENS_DICOM_TLS_CA": str(certs.ca),
        },
    )
    for _ in range(4):
        assert echoscu(tls_port, *with_cert(certs.client, certs.ca)).returncode == 0
        assert echoscu(proc.port).returncode == 0
    assert echoscu(tls_port, *with_cert(certs.untrusted_client, certs.ca)).returncode != 0
    assert echoscu(tls_port).returncode != 0


# --- our SCUs against dcmtk storescp ------------------------------------------------------------


@pytest.fixture
def storescp(tmp_path):
    processes: list[subprocess.Popen] = []

    def start(server: Pair, ca: Path) -> SimpleNamespace:
        port, folder = free_port(), tmp_path / f"storescp-{len(processes)}"
        folder.mkdir()
        process = subprocess.Popen(
            [
                require_program("storescp"),
                "-aet",
                STORESCP_AE,
                "-od",
                str(folder),
                "+tls",
                str(server.key),
                str(server.cert),
                "+cf",
                str(ca),
                "--require-peer-cert",
                str(port),
            ],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        processes.append(process)
        port_wait(port, process)
        return SimpleNamespace(port=port, folder=folder)

    yield start
    for process in processes:
        process.terminate()
        process.wait(10)


def port_wait(port: int, process: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else "storescp exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"storescp did not listen on {port}")


def sr_dataset():
    return build_sr(make_payload(make_ct_slices(2)))


def test_our_store_scu_stores_into_storescp_over_tls(tls_settings, storescp, certs):
    peer = storescp(certs.server, certs.ca)  # storescp trusts our CA, so it accepts our certificate
    session = StoreSession(
        calling_ae_title="PACSLENS",
        host="127.0.0.1",
        port=peer.port,
        called_ae_title=STORESCP_AE,
        tls=dicom_tls.client_tls_args(tls=True, host="127.0.0.1"),
    )
    assert session.open() is None
    try:
        outcome = session.store(sr_dataset())
    finally:
        session.close()
    assert outcome.kind == OutcomeKind.SUCCESS, outcome
    assert len(list(peer.folder.iterdir())) == 1


def test_our_store_scu_refuses_a_peer_certificate_from_another_ca(tls_settings, storescp, certs):
    peer = storescp(certs.untrusted_server, certs.ca)
    session = StoreSession(
        calling_ae_title="PACSLENS",
        host="127.0.0.1",
        port=peer.port,
        called_ae_title=STORESCP_AE,
        tls=dicom_tls.client_tls_args(tls=True, host="127.0.0.1"),
    )
    failure = session.open()
    session.close()
    assert failure is not None and failure.kind == OutcomeKind.CONFIG_ERROR
    assert "CERTIFICATE_VERIFY_FAILED" in failure.describe()
    assert list(peer.folder.iterdir()) == []


def test_the_delivery_sender_uses_tls_when_the_ae_title_says_so(db, tls_settings, storescp, certs):
    peer = storescp(certs.server, certs.ca)
    ae = ApplicationEntity.objects.create(ae_title=STORESCP_AE, host="127.0.0.1", port=peer.port, tls=True)
    destination = Destination.objects.create(name="tls-pacs", kind="dicom", application_entity=ae)
    context = SimpleNamespace(sessions={})
    try:
        outcome = _send_dicom(destination, sr_dataset(), context)
    finally:
        for session in context.sessions.values():
            session.close()
    assert outcome.kind == OutcomeKind.SUCCESS, outcome
    assert len(list(peer.folder.iterdir())) == 1


# --- configuration ---------------------------------------------------------------------------------


def test_a_missing_certificate_file_fails_loudly(tls_settings, tmp_path, monkeypatch):
    tls_settings.DICOM_TLS_CERT = tmp_path / "missing.pem"
    with pytest.raises(ImproperlyConfigured):
        dicom_tls.server_context()
    monkeypatch.setenv("PACSLENS_DICOM_TLS_CERT", str(tmp_path / "missing.pem"))
    with pytest.raises(ImproperlyConfigured):
        envfile("PACSLENS_DICOM_TLS_CERT", required=False)
    monkeypatch.delenv("PACSLENS_DICOM_TLS_CERT")
    with pytest.raises(ImproperlyConfigured):
        envfile("PACSLENS_DICOM_TLS_CERT", required=True)


def test_the_contexts_follow_bcp_195(tls_settings):
    for context in (dicom_tls.server_context(), dicom_tls.client_context()):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.verify_mode == ssl.CERT_REQUIRED
        tls12 = [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert tls12 and all("GCM" in name or "CHACHA20" in name for name in tls12)
        assert all(c["kea"] in ("kx-ecdhe", "kx-dhe") for c in context.get_ciphers() if c["protocol"] == "TLSv1.2")
    assert dicom_tls.client_context().check_hostname is False


def plain_associate(port: int):
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSLENS")
    if assoc.is_established:
        assoc.release()
    return assoc


def test_outbound_tls_never_trusts_the_system_cas(tls_settings):
    tls_settings.DICOM_TLS_CA = None
    context = dicom_tls.client_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.cert_store_stats()["x509_ca"] == 0


@pytest.mark.django_db
def test_an_outbound_tls_ae_without_a_ca_file_refuses_to_start(tls_settings):
    tls_settings.DICOM_TLS_CA = None
    ApplicationEntity.objects.create(ae_title="TLSPACS", host="pacs.example", port=2762, tls=True)
    with pytest.raises(SystemCheckError, match="to TLSPACS needs PACSLENS_DICOM_TLS_CA"):
        call_command("check")
    tls_settings.DICOM_TLS_CA = Path(__file__)  # any set CA file: the check passes
    call_command("check")


# --- a certificate bound to a calling AE title -------------------------------------------------------


@pytest.mark.parametrize("name", ["modality", "LOCALHOST"])  # the subject CN; a DNS subjectAltName
def test_a_certificate_carrying_the_bound_name_is_accepted(listener_in_thread, certs, name):
    ApplicationEntity.objects.filter(ae_title=CALLING).update(tls_certificate_name=name)
    listener = listener_in_thread("tls")
    assert echoscu(listener.port, *with_cert(certs.client, certs.ca)).returncode == 0


def test_a_trusted_certificate_not_carrying_the_bound_name_is_rejected(listener_in_thread, certs):
    ApplicationEntity.objects.filter(ae_title=CALLING).update(tls_certificate_name="ct-scanner-2")
    listener = listener_in_thread("tls")
    result = echoscu(listener.port, *with_cert(certs.client, certs.ca))
    assert result.returncode != 0
    assert "Rejected" in result.stderr or "rejected" in result.stderr.lower()


def test_a_plain_association_for_an_ae_title_bound_to_a_certificate_is_rejected(listener_in_thread, certs):
    ApplicationEntity.objects.filter(ae_title=CALLING).update(tls_certificate_name="modality")
    listener = listener_in_thread("both")
    assoc = plain_associate(listener.port)
    assert assoc.is_rejected
    assert assoc.acceptor.primitive.diagnostic == 3  # calling AE title not recognised
