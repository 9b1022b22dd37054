"""HTTP and MLLP probes: DICOMweb, FHIR and HL7 receivers, for the Test buttons and `manage.py assess`.

DICOMweb and FHIR probes are GET/OPTIONS only; MLLP only opens and closes a TCP connection.
"""

from __future__ import annotations

import socket
import time

import requests
from pydicom.uid import generate_uid

from pacslens.ops.probes.dimse import probe_dicom_echo
from pacslens.ops.probes.result import DEFAULT_TIMEOUT, ProbeResult
from results.deliver.senders import http_session
from routing.oauth import TokenError


def probe_qido(base_url: str, *, headers: dict, auth, timeout: float) -> ProbeResult:
    url = f"{base_url.rstrip('/')}/studies"
    return _http_probe(
        "QIDO-RS",
        "GET",
        url,
        timeout=timeout,
        headers={**headers, "Accept": "application/dicom+json"},
        auth=auth,
        params={"StudyInstanceUID": generate_uid(), "limit": "1"},
        ok_statuses={200: "answers (no match for the probe's study)", 204: "answers (no match)"},
    )


def probe_wado(base_url: str, *, headers: dict, auth, timeout: float) -> ProbeResult:
    url = f"{base_url.rstrip('/')}/studies/{generate_uid()}/metadata"
    return _http_probe(
        "WADO-RS",
        "GET",
        url,
        timeout=timeout,
        headers={**headers, "Accept": "application/dicom+json"},
        auth=auth,
        ok_statuses={404: "answers (404 for a study that does not exist, as expected)", 200: "answers", 204: "answers"},
    )


def probe_stow(base_url: str, *, headers: dict, auth, timeout: float) -> ProbeResult:
    """OPTIONS only: a STOW-RS POST would store. Many servers do not answer OPTIONS: then unknown."""
    url = f"{base_url.rstrip('/')}/studies"
    try:
        response = requests.options(url, headers=headers, auth=auth, timeout=timeout)
    except requests.RequestException as exc:
        return ProbeResult("STOW-RS", False, f"no answer: {type(exc).__name__}")
    allow = response.headers.get("Allow", "") + "," + response.headers.get("Access-Control-Allow-Methods", "")
    if response.status_code < 300 and "POST" in allow.upper():
        return ProbeResult("STOW-RS", True, f"OPTIONS allows POST on {url}")
    if response.status_code in (401, 403):
        return ProbeResult("STOW-RS", False, f"HTTP {response.status_code}: credentials refused")
    return ProbeResult(
        "STOW-RS",
        None,
        f"not confirmed without storing (OPTIONS answered HTTP {response.status_code}); "
        "confirm with the PACS administrator or a test delivery to a test study",
    )


def probe_fhir(base_url: str, *, token: str, timeout: float) -> ProbeResult:
    headers = {"Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{base_url.rstrip('/')}/metadata"
    try:
        response = requests.get(url, headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        return ProbeResult("FHIR metadata", False, f"no answer: {type(exc).__name__}")
    if response.status_code != 200:
        return ProbeResult("FHIR metadata", False, f"HTTP {response.status_code}")
    try:
        body = response.json()
    except ValueError:
        return ProbeResult("FHIR metadata", False, "answer is not JSON")
    if body.get("resourceType") != "CapabilityStatement":
        return ProbeResult("FHIR metadata", False, "answer is not a CapabilityStatement")
    interactions = _fhir_interactions(body)
    needed = {"Observation": ["create"], "ImagingStudy": ["update", "search-type"]}
    missing = [
        f"{kind} {i}" for kind, wanted in needed.items() for i in wanted if i not in interactions.get(kind, set())
    ]
    details = [f"FHIR {body.get('fhirVersion', '?')}, software {body.get('software', {}).get('name', '?')}"]
    details += [f"{kind}: {', '.join(sorted(interactions.get(kind, set()))) or 'not listed'}" for kind in needed]
    if missing:
        return ProbeResult("FHIR metadata", None, f"answers, but does not list: {', '.join(missing)}", details)
    return ProbeResult(
        "FHIR metadata", True, "CapabilityStatement lists Observation create and ImagingStudy update", details
    )


def probe_mllp(host: str, port: int, *, timeout: float) -> ProbeResult:
    result = probe_tcp(host=host, port=port, timeout=timeout)
    result.name = "MLLP connect"
    if result.ok:
        result.summary = f"TCP connection to {host}:{port} accepted (no message sent)"
    else:
        result.summary = f"cannot connect to {result.reason}"
    return result


# --- the endpoint Test buttons ---------------------------------------------------------------


def probe_destination(destination) -> ProbeResult:
    """The right probe for a Destination of any kind, with its own timeout and credentials."""
    timeout = min(destination.timeout_seconds, 15.0)
    if destination.kind == "dicom":
        ae = destination.application_entity
        return probe_dicom_echo(host=ae.host, port=ae.port, called_ae_title=ae.ae_title, timeout=timeout, tls=ae.tls)
    if destination.kind in ("dicomweb", "fhir"):
        with http_session(destination) as session:
            return probe_http(url=destination.base_url, kind=destination.kind, session=session, timeout=timeout)
    return probe_tcp(host=destination.host, port=destination.port, timeout=timeout)


def probe_http(
    *,
    url: str,
    kind: str,
    auth: tuple[str, str] | None = None,
    headers: dict | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    session: requests.Session | None = None,
) -> ProbeResult:
    """GET a cheap, authenticated resource: QIDO-RS `studies?limit=1` or FHIR `metadata`.
    `session` carries the endpoint's authentication (OAuth included) and CA bundle."""
    base = url.rstrip("/")
    if kind == "fhir":
        name, target, accept = "FHIR metadata", f"{base}/metadata", "application/fhir+json"
    else:
        name, target, accept = "QIDO-RS", f"{base}/studies?limit=1", "application/dicom+json"
    started = time.perf_counter()

    def answer(ok: bool, summary: str, code: str = "", reason: str = "") -> ProbeResult:
        return ProbeResult(name, ok, summary, code=code, reason=reason, seconds=seconds)

    try:
        response = (session or requests).get(
            target, headers={"Accept": accept, **(headers or {})}, auth=auth, timeout=timeout
        )
    except TokenError as exc:
        seconds = time.perf_counter() - started
        return answer(False, "no OAuth token", str(exc.code or ""), str(exc))
    except requests.exceptions.SSLError:
        seconds = time.perf_counter() - started
        return answer(False, "TLS certificate not trusted", "", f"{base}: check the CA bundle")
    except requests.RequestException as exc:
        seconds = time.perf_counter() - started
        return answer(False, "no HTTP answer", "", f"{type(exc).__name__}: cannot reach {base}")
    seconds = time.perf_counter() - started
    code = f"HTTP {response.status_code}"
    if response.status_code in (200, 204):
        return answer(True, f"{'FHIR capability statement' if kind == 'fhir' else 'QIDO-RS'} answered", code)
    if response.status_code in (401, 403):
        return answer(False, "credentials refused", code, "check the user name, password, token or OAuth client")
    if response.status_code == 404:
        return answer(False, "not found", code, f"{target} does not exist: check the base URL")
    return answer(False, "unexpected answer", code, response.reason or "")


def probe_tcp(*, host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> ProbeResult:
    """An HL7 MLLP receiver: a TCP connect is all we can do without sending a message."""
    started = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        return ProbeResult(
            "TCP connect",
            False,
            "cannot connect",
            reason=f"{host}:{port}: {exc.strerror or type(exc).__name__}",
            seconds=time.perf_counter() - started,
        )
    return ProbeResult(
        "TCP connect", True, f"TCP connection to {host}:{port} accepted", seconds=time.perf_counter() - started
    )


# --- helpers -----------------------------------------------------------------------------------


def _http_probe(
    name: str,
    method: str,
    url: str,
    *,
    timeout: float,
    headers: dict,
    auth,
    ok_statuses: dict[int, str],
    params: dict | None = None,
) -> ProbeResult:
    try:
        response = requests.request(method, url, headers=headers, auth=auth, params=params, timeout=timeout)
    except requests.RequestException as exc:
        return ProbeResult(name, False, f"no answer: {type(exc).__name__}")
    if response.status_code in ok_statuses:
        return ProbeResult(name, True, ok_statuses[response.status_code])
    if response.status_code in (401, 403):
        return ProbeResult(name, False, f"HTTP {response.status_code}: credentials refused")
    return ProbeResult(name, False, f"HTTP {response.status_code}")


def _fhir_interactions(capability: dict) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for rest in capability.get("rest", []):
        for resource in rest.get("resource", []):
            codes = {i.get("code", "") for i in resource.get("interaction", [])}
            if resource.get("conditionalCreate"):
                codes.add("conditional-create")
            if resource.get("conditionalUpdate"):
                codes.add("conditional-update")
            found.setdefault(resource.get("type", ""), set()).update(codes)
    return found
