"""The probes of `manage.py assess`: each asks a peer one question and never stores anything in it.

DIMSE queries and retrieves name a Study Instance UID generated for the probe, which no PACS
has: the answer says whether the service works (and whether the PACS knows our AE title as a
move destination) without a single patient record crossing the wire. DICOMweb and FHIR probes
are GET/OPTIONS only; MLLP only opens and closes a TCP connection.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import requests
from django.conf import settings
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, _config, build_role
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from routing.receive import dicom_tls

# What we would send or retrieve: our SR first, then common image classes.
STORAGE_SOP_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR: what PacsLens stores as a result
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.1",  # CR Image
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image (presentation)
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
]
PROBE_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
]
SR_CLASS = STORAGE_SOP_CLASSES[0]
REJECT_REASONS = {1: "no reason given", 2: "application context not supported", 3: "calling AE title not recognised",
                  7: "called AE title not recognised"}


@dataclass
class Probe:
    """One question and its answer. `ok` is None when the answer is inconclusive."""

    name: str
    ok: bool | None
    summary: str
    details: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DimseTarget:
    ae_title: str
    host: str
    port: int
    tls: bool = False

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")


class AssociationRefused(Exception):
    pass


def associate(target: DimseTarget, contexts: list[tuple[str, list[str]]], *, timeout: float, roles=None):
    """An established association, or AssociationRefused saying why not (rejection reason, no answer...)."""
    _config.LOG_REQUEST_IDENTIFIERS = False  # identifiers never reach our logs
    _config.LOG_RESPONSE_IDENTIFIERS = False
    ae = AE(ae_title=settings.AE_TITLE)
    for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, name, timeout)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    tls_args = dicom_tls.client_tls_args(tls=target.tls, host=target.host)
    try:
        assoc = ae.associate(target.host, target.port, ae_title=target.ae_title, ext_neg=roles, tls_args=tls_args)
    except (OSError, ValueError) as exc:
        raise AssociationRefused(f"cannot associate: {exc}") from None
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        reason = REJECT_REASONS.get(rj.diagnostic, f"reason {rj.diagnostic}") if rj.result_source == 1 else \
            f"source {rj.result_source} reason {rj.diagnostic}"
        kind = "permanently" if rj.result == 1 else "transiently"
        raise AssociationRefused(f"association rejected {kind}: {reason} (our AE title {settings.AE_TITLE})")
    raise AssociationRefused("no association: connection refused, aborted or timed out")


def probe_echo(target: DimseTarget, *, timeout: float) -> Probe:
    try:
        assoc = associate(target, [(Verification, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])], timeout=timeout)
    except AssociationRefused as exc:
        return Probe("C-ECHO", False, str(exc))
    try:
        status = assoc.send_c_echo()
        code = _status(status)
    finally:
        _release(assoc)
    if code == 0x0000:
        return Probe("C-ECHO", True, "answered Success")
    return Probe("C-ECHO", False, f"answered {_hex(code)}")


def probe_find(target: DimseTarget, *, timeout: float) -> list[Probe]:
    """Study Root C-FIND at STUDY, SERIES and IMAGE level, for a study that does not exist."""
    model = StudyRootQueryRetrieveInformationModelFind
    try:
        assoc = associate(target, [(model, PROBE_TRANSFER_SYNTAXES[:2])], timeout=timeout)
    except AssociationRefused as exc:
        return [Probe("C-FIND (Study Root)", False, str(exc))]
    probes = []
    study, series = generate_uid(), generate_uid()
    try:
        for level in ("STUDY", "SERIES", "IMAGE"):
            identifier = Dataset()
            identifier.QueryRetrieveLevel = level
            identifier.StudyInstanceUID = study
            if level in ("SERIES", "IMAGE"):
                identifier.SeriesInstanceUID = series if level == "IMAGE" else ""
            if level == "IMAGE":
                identifier.SOPInstanceUID = ""
            codes = [_status(status) for status, _ in assoc.send_c_find(identifier, model)]
            final = codes[-1] if codes else None
            name = f"C-FIND {level} level"
            if final == 0x0000:
                probes.append(Probe(name, True, "answered Success (no match for the probe's study, as expected)"))
            else:
                probes.append(Probe(name, False, f"answered {_hex(final)}"))
            if not assoc.is_established:
                break
    finally:
        _release(assoc)
    return probes


def probe_move(target: DimseTarget, *, timeout: float, move_destination: str) -> Probe:
    model = StudyRootQueryRetrieveInformationModelMove
    name = f"C-MOVE to {move_destination}"
    try:
        assoc = associate(target, [(model, PROBE_TRANSFER_SYNTAXES[:2])], timeout=timeout)
    except AssociationRefused as exc:
        return Probe(name, False, str(exc))
    try:
        codes = [_status(status) for status, _ in assoc.send_c_move(_study_identifier(), move_destination, model)]
    finally:
        _release(assoc)
    final = codes[-1] if codes else None
    if final in (0x0000, 0xFF00):
        return Probe(name, True, f"accepted: the PACS knows {move_destination} as a move destination")
    if final == 0xA801:
        return Probe(name, False, f"refused 0xA801: the PACS does not know {move_destination} as a move destination")
    if final in (0x0122, 0x0124):
        return Probe(name, False, f"refused {_hex(final)}: C-MOVE not supported or not authorised for our AE title")
    if final is None:
        # Orthanc, for one, aborts a C-MOVE to a destination it does not know.
        return Probe(name, False, f"the PACS aborted the C-MOVE without a status: most likely it does not know "
                                  f"{move_destination} as a move destination")
    return Probe(name, None, f"request accepted, answered {_hex(final)} for the probe's (non-existent) study; "
                             f"whether the PACS knows {move_destination} is not confirmed until a real retrieve")


def probe_get(target: DimseTarget, *, timeout: float) -> Probe:
    model = StudyRootQueryRetrieveInformationModelGet
    contexts = [(model, PROBE_TRANSFER_SYNTAXES[:2])] + [(uid, PROBE_TRANSFER_SYNTAXES[:2]) for uid in STORAGE_SOP_CLASSES]
    roles = [build_role(uid, scp_role=True) for uid in STORAGE_SOP_CLASSES]
    try:
        assoc = associate(target, contexts, timeout=timeout, roles=roles)
    except AssociationRefused as exc:
        return Probe("C-GET", False, str(exc))
    try:
        if not any(cx.abstract_syntax == model for cx in assoc.accepted_contexts):
            return Probe("C-GET", False, "the PACS does not accept the Study Root C-GET model")
        scp_roles = sorted({UID(cx.abstract_syntax).name for cx in assoc.accepted_contexts if cx.as_scp})
        codes = [_status(status) for status, _ in assoc.send_c_get(_study_identifier(), model)]
    finally:
        _release(assoc)
    final = codes[-1] if codes else None
    details = [f"storage SCP role accepted for: {', '.join(scp_roles) or 'none'}"]
    if final is None:
        return Probe("C-GET", False, "the PACS aborted the C-GET without a status (it may require our AE title "
                                     "to be registered for retrieval)", details)
    if final in (0x0000, 0xFF00, 0xA701, 0xA702, 0xC000) and scp_roles:
        return Probe("C-GET", True, f"supported (answered {_hex(final)} for the probe's study)", details)
    if not scp_roles:
        return Probe("C-GET", False, "the PACS would not send instances back on our association (no SCP role accepted)", details)
    return Probe("C-GET", None, f"answered {_hex(final)}", details)


def probe_storage(target: DimseTarget, *, timeout: float) -> Probe:
    """Propose every (storage class, transfer syntax) pair, read what was accepted, release."""
    contexts = [(uid, [syntax]) for uid in STORAGE_SOP_CLASSES for syntax in PROBE_TRANSFER_SYNTAXES]
    try:
        assoc = associate(target, contexts, timeout=timeout)
    except AssociationRefused as exc:
        return Probe("Storage SCP negotiation", False, str(exc))
    try:
        accepted: dict[str, list[str]] = {}
        for cx in assoc.accepted_contexts:
            accepted.setdefault(str(cx.abstract_syntax), []).append(UID(cx.transfer_syntax[0]).name)
    finally:
        _release(assoc)
    details = [f"{UID(uid).name}: {_syntaxes(accepted.get(uid, []))}" for uid in STORAGE_SOP_CLASSES]
    if SR_CLASS in accepted:
        return Probe("Storage SCP negotiation", True, "accepts Comprehensive 3D SR (our result object)", details)
    return Probe("Storage SCP negotiation", False, "does not accept Comprehensive 3D SR: SR write-back by C-STORE "
                                                    "will be refused", details)


# --- HTTP and MLLP -------------------------------------------------------------------------


def probe_qido(base_url: str, *, headers: dict, auth, timeout: float) -> Probe:
    url = f"{base_url.rstrip('/')}/studies"
    return _http_probe("QIDO-RS", "GET", url, timeout=timeout, headers={**headers, "Accept": "application/dicom+json"},
                       auth=auth, params={"StudyInstanceUID": generate_uid(), "limit": "1"},
                       ok_statuses={200: "answers (no match for the probe's study)", 204: "answers (no match)"})


def probe_wado(base_url: str, *, headers: dict, auth, timeout: float) -> Probe:
    url = f"{base_url.rstrip('/')}/studies/{generate_uid()}/metadata"
    return _http_probe("WADO-RS", "GET", url, timeout=timeout, headers={**headers, "Accept": "application/dicom+json"},
                       auth=auth, ok_statuses={404: "answers (404 for a study that does not exist, as expected)",
                                               200: "answers", 204: "answers"})


def probe_stow(base_url: str, *, headers: dict, auth, timeout: float) -> Probe:
    """OPTIONS only: a STOW-RS POST would store. Many servers do not answer OPTIONS: then unknown."""
    url = f"{base_url.rstrip('/')}/studies"
    try:
        response = requests.options(url, headers=headers, auth=auth, timeout=timeout)
    except requests.RequestException as exc:
        return Probe("STOW-RS", False, f"no answer: {type(exc).__name__}")
    allow = response.headers.get("Allow", "") + "," + response.headers.get("Access-Control-Allow-Methods", "")
    if response.status_code < 300 and "POST" in allow.upper():
        return Probe("STOW-RS", True, f"OPTIONS allows POST on {url}")
    if response.status_code in (401, 403):
        return Probe("STOW-RS", False, f"HTTP {response.status_code}: credentials refused")
    return Probe("STOW-RS", None, f"not confirmed without storing (OPTIONS answered HTTP {response.status_code}); "
                                   "confirm with the PACS administrator or a test delivery to a test study")


def probe_fhir(base_url: str, *, token: str, timeout: float) -> Probe:
    headers = {"Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{base_url.rstrip('/')}/metadata"
    try:
        response = requests.get(url, headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        return Probe("FHIR metadata", False, f"no answer: {type(exc).__name__}")
    if response.status_code != 200:
        return Probe("FHIR metadata", False, f"HTTP {response.status_code}")
    try:
        body = response.json()
    except ValueError:
        return Probe("FHIR metadata", False, "answer is not JSON")
    if body.get("resourceType") != "CapabilityStatement":
        return Probe("FHIR metadata", False, "answer is not a CapabilityStatement")
    interactions = _fhir_interactions(body)
    needed = {"Observation": ["create"], "ImagingStudy": ["update", "search-type"]}
    missing = [f"{kind} {i}" for kind, wanted in needed.items() for i in wanted if i not in interactions.get(kind, set())]
    details = [f"FHIR {body.get('fhirVersion', '?')}, software {body.get('software', {}).get('name', '?')}"]
    details += [f"{kind}: {', '.join(sorted(interactions.get(kind, set()))) or 'not listed'}" for kind in needed]
    if missing:
        return Probe("FHIR metadata", None, f"answers, but does not list: {', '.join(missing)}", details)
    return Probe("FHIR metadata", True, "CapabilityStatement lists Observation create and ImagingStudy update", details)


def probe_mllp(host: str, port: int, *, timeout: float) -> Probe:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        return Probe("MLLP connect", False, f"cannot connect to {host}:{port}: {exc.strerror or type(exc).__name__}")
    return Probe("MLLP connect", True, f"TCP connection to {host}:{port} accepted (no message sent)")


# --- helpers -----------------------------------------------------------------------------------


def _http_probe(name: str, method: str, url: str, *, timeout: float, headers: dict, auth, ok_statuses: dict[int, str],
                params: dict | None = None) -> Probe:
    try:
        response = requests.request(method, url, headers=headers, auth=auth, params=params, timeout=timeout)
    except requests.RequestException as exc:
        return Probe(name, False, f"no answer: {type(exc).__name__}")
    if response.status_code in ok_statuses:
        return Probe(name, True, ok_statuses[response.status_code])
    if response.status_code in (401, 403):
        return Probe(name, False, f"HTTP {response.status_code}: credentials refused")
    return Probe(name, False, f"HTTP {response.status_code}")


def _syntaxes(names: list[str]) -> str:
    if not names:
        return "not accepted"
    if len(names) == len(PROBE_TRANSFER_SYNTAXES):
        return "all proposed transfer syntaxes (uncompressed, deflate, JPEG lossless, JPEG-LS, JPEG 2000, RLE)"
    return ", ".join(names)


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


def _study_identifier() -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = generate_uid()
    return identifier


def _status(status: Dataset | None) -> int | None:
    return int(status.Status) if status is not None and "Status" in status else None


def _hex(code: int | None) -> str:
    return "nothing (association aborted or timed out)" if code is None else f"0x{code:04X}"


def _release(assoc) -> None:
    if assoc.is_established:
        assoc.release()
