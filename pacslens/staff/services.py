"""The endpoint Test buttons: C-ECHO a DICOM node, probe a DICOMweb/FHIR server over HTTP, connect
to an HL7 MLLP port. Each returns a ProbeResult the page shows inline: success, the status the
peer answered, why it refused, and how long it took. Nothing here touches the database.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import requests
from django.conf import settings
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from results.deliver.dicom_send import classify_rejection
from routing.receive import dicom_tls

DEFAULT_TIMEOUT = 5.0


@dataclass
class ProbeResult:
    ok: bool
    summary: str
    code: str = ""  # DICOM status, A-ASSOCIATE-RJ result/source/reason, or HTTP status
    reason: str = ""  # why it failed, in words the user can act on
    seconds: float = 0.0

    @property
    def took(self) -> str:
        return f"{self.seconds * 1000:.0f} ms"

    def audit_text(self) -> str:
        return f"{'ok' if self.ok else 'failed'} {self.code} {self.reason or self.summary}".strip()[:500]


def probe_dicom_echo(*, host: str, port: int, called_ae_title: str, calling_ae_title: str | None = None,
                     timeout: float = DEFAULT_TIMEOUT, tls: bool = False) -> ProbeResult:
    """One association with a C-ECHO: what a PACS administrator means by "can we reach it"."""
    ae = AE(ae_title=calling_ae_title or settings.AE_TITLE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    connected: list[bool] = []
    started = time.perf_counter()
    assoc = ae.associate(host, port, ae_title=called_ae_title, tls_args=dicom_tls.client_tls_args(tls=tls, host=host),
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay, [connected])])
    try:
        if assoc.is_established:
            status = assoc.send_c_echo()
            seconds = time.perf_counter() - started
            if status is not None and "Status" in status:
                code = f"0x{int(status.Status):04X}"
                if status.Status == 0x0000:
                    return ProbeResult(True, f"C-ECHO accepted by {called_ae_title}", code, "", seconds)
                return ProbeResult(False, "C-ECHO answered with a failure status", code, "the peer refused the echo", seconds)
            return ProbeResult(False, "no C-ECHO response", "", "the association dropped or timed out", seconds)
        seconds = time.perf_counter() - started
        if assoc.is_rejected and assoc.acceptor.primitive is not None:
            rsp = assoc.acceptor.primitive
            outcome = classify_rejection(int(rsp.result), int(rsp.result_source), int(rsp.diagnostic),
                                         peer=f"{called_ae_title}@{host}:{port}",
                                         description=f"{rsp.result_str}, {rsp.source_str}: {rsp.reason_str}")
            return ProbeResult(False, "association rejected", str(outcome.code), outcome.message, seconds)
        tls_args = dicom_tls.client_tls_args(tls=tls, host=host)
        problem = dicom_tls.handshake_problem(tls_args, host, port, timeout) if tls_args and not connected else None
        if problem:
            return ProbeResult(False, "TLS handshake failed", "", f"{problem}: check the CA file and the certificates "
                               "on both sides (PACSLENS_DICOM_TLS_CA, PACSLENS_DICOM_TLS_CERT)", seconds)
        if not connected:
            return ProbeResult(False, "cannot connect", "", f"nothing answers on {host}:{port} (refused or timed out)", seconds)
        return ProbeResult(False, "association aborted", "", "the peer aborted or did not answer the association request", seconds)
    finally:
        if assoc.is_established:
            assoc.release()


def probe_http(*, url: str, kind: str, auth: tuple[str, str] | None = None, headers: dict | None = None,
               timeout: float = DEFAULT_TIMEOUT) -> ProbeResult:
    """GET a cheap, authenticated resource: QIDO-RS `studies?limit=1` or FHIR `metadata`."""
    base = url.rstrip("/")
    if kind == "fhir":
        target, accept = f"{base}/metadata", "application/fhir+json"
    else:
        target, accept = f"{base}/studies?limit=1", "application/dicom+json"
    started = time.perf_counter()
    try:
        response = requests.get(target, headers={"Accept": accept, **(headers or {})}, auth=auth, timeout=timeout)
    except requests.RequestException as exc:
        return ProbeResult(False, "no HTTP answer", "", f"{type(exc).__name__}: cannot reach {base}",
                           time.perf_counter() - started)
    seconds = time.perf_counter() - started
    code = f"HTTP {response.status_code}"
    if response.status_code in (200, 204):
        return ProbeResult(True, f"{'FHIR capability statement' if kind == 'fhir' else 'QIDO-RS'} answered", code, "", seconds)
    if response.status_code in (401, 403):
        return ProbeResult(False, "credentials refused", code, "check the user name, password or token", seconds)
    if response.status_code == 404:
        return ProbeResult(False, "not found", code, f"{target} does not exist: check the base URL", seconds)
    return ProbeResult(False, "unexpected answer", code, response.reason or "", seconds)


def probe_tcp(*, host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> ProbeResult:
    """An HL7 MLLP receiver: a TCP connect is all we can do without sending a message."""
    started = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        return ProbeResult(False, "cannot connect", "", f"{host}:{port}: {exc.strerror or type(exc).__name__}",
                           time.perf_counter() - started)
    return ProbeResult(True, f"TCP connection to {host}:{port} accepted", "", "", time.perf_counter() - started)


def probe_destination(destination) -> ProbeResult:
    """The right probe for a Destination of any kind, with its own timeout and credentials."""
    from results.deliver.senders import http_auth

    timeout = min(destination.timeout_seconds, 15.0)
    if destination.kind == "dicom":
        ae = destination.application_entity
        return probe_dicom_echo(host=ae.host, port=ae.port, called_ae_title=ae.ae_title, timeout=timeout, tls=ae.tls)
    if destination.kind in ("dicomweb", "fhir"):
        headers: dict[str, str] = {}
        basic = http_auth(destination).apply(headers)
        return probe_http(url=destination.base_url, kind=destination.kind, auth=basic, headers=headers, timeout=timeout)
    return probe_tcp(host=destination.host, port=destination.port, timeout=timeout)


def _nodelay(event, connected: list[bool]) -> None:
    # As in results.deliver.dicom_send: without TCP_NODELAY, Nagle holds the small PDUs back.
    connected.append(True)
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
