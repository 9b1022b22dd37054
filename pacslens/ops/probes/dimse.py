"""DIMSE probes: the Test buttons' C-ECHO, and the integration set of `manage.py assess`.

Queries and retrieves name a Study Instance UID generated for the probe, which no PACS has: the
answer says whether the service works (and whether the PACS knows our AE title as a move
destination) without a single patient record crossing the wire.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from django.conf import settings
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # pynetdicom generates these names at import time
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from pacslens.ops.probes.result import DEFAULT_TIMEOUT, ProbeResult
from results.deliver.dicom_send import classify_rejection
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
# Keyed by the A-ASSOCIATE-RJ diagnostic, which pynetdicom types as optional.
REJECT_REASONS: dict[int | None, str] = {
    1: "no reason given",
    2: "application context not supported",
    3: "calling AE title not recognised",
    7: "called AE title not recognised",
}


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
        assert rj is not None  # a rejected association keeps the A-ASSOCIATE-RJ it received
        reason = (
            REJECT_REASONS.get(rj.diagnostic, f"reason {rj.diagnostic}")
            if rj.result_source == 1
            else f"source {rj.result_source} reason {rj.diagnostic}"
        )
        kind = "permanently" if rj.result == 1 else "transiently"
        raise AssociationRefused(f"association rejected {kind}: {reason} (our AE title {settings.AE_TITLE})")
    raise AssociationRefused("no association: connection refused, aborted or timed out")


def probe_echo(target: DimseTarget, *, timeout: float) -> ProbeResult:
    try:
        assoc = associate(target, [(Verification, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])], timeout=timeout)
    except AssociationRefused as exc:
        return ProbeResult("C-ECHO", False, str(exc))
    try:
        status = assoc.send_c_echo()
        code = _status(status)
    finally:
        _release(assoc)
    if code == 0x0000:
        return ProbeResult("C-ECHO", True, "answered Success")
    return ProbeResult("C-ECHO", False, f"answered {_hex(code)}")


def probe_find(target: DimseTarget, *, timeout: float) -> list[ProbeResult]:
    """Study Root C-FIND at STUDY, SERIES and IMAGE level, for a study that does not exist."""
    model = StudyRootQueryRetrieveInformationModelFind
    try:
        assoc = associate(target, [(model, PROBE_TRANSFER_SYNTAXES[:2])], timeout=timeout)
    except AssociationRefused as exc:
        return [ProbeResult("C-FIND (Study Root)", False, str(exc))]
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
                probes.append(ProbeResult(name, True, "answered Success (no match for the probe's study, as expected)"))
            else:
                probes.append(ProbeResult(name, False, f"answered {_hex(final)}"))
            if not assoc.is_established:
                break
    finally:
        _release(assoc)
    return probes


def probe_move(target: DimseTarget, *, timeout: float, move_destination: str) -> ProbeResult:
    model = StudyRootQueryRetrieveInformationModelMove
    name = f"C-MOVE to {move_destination}"
    try:
        assoc = associate(target, [(model, PROBE_TRANSFER_SYNTAXES[:2])], timeout=timeout)
    except AssociationRefused as exc:
        return ProbeResult(name, False, str(exc))
    try:
        codes = [_status(status) for status, _ in assoc.send_c_move(_study_identifier(), move_destination, model)]
    finally:
        _release(assoc)
    final = codes[-1] if codes else None
    if final in (0x0000, 0xFF00):
        return ProbeResult(name, True, f"accepted: the PACS knows {move_destination} as a move destination")
    if final == 0xA801:
        return ProbeResult(
            name, False, f"refused 0xA801: the PACS does not know {move_destination} as a move destination"
        )
    if final in (0x0122, 0x0124):
        return ProbeResult(
            name, False, f"refused {_hex(final)}: C-MOVE not supported or not authorised for our AE title"
        )
    if final is None:
        # Orthanc, for one, aborts a C-MOVE to a destination it does not know.
        return ProbeResult(
            name,
            False,
            f"the PACS aborted the C-MOVE without a status: most likely it does not know "
            f"{move_destination} as a move destination",
        )
    return ProbeResult(
        name,
        None,
        f"request accepted, answered {_hex(final)} for the probe's (non-existent) study; "
        f"whether the PACS knows {move_destination} is not confirmed until a real retrieve",
    )


def probe_get(target: DimseTarget, *, timeout: float) -> ProbeResult:
    model = StudyRootQueryRetrieveInformationModelGet
    contexts = [(model, PROBE_TRANSFER_SYNTAXES[:2])] + [
        (uid, PROBE_TRANSFER_SYNTAXES[:2]) for uid in STORAGE_SOP_CLASSES
    ]
    roles = [build_role(uid, scp_role=True) for uid in STORAGE_SOP_CLASSES]
    try:
        assoc = associate(target, contexts, timeout=timeout, roles=roles)
    except AssociationRefused as exc:
        return ProbeResult("C-GET", False, str(exc))
    try:
        if not any(cx.abstract_syntax == model for cx in assoc.accepted_contexts):
            return ProbeResult("C-GET", False, "the PACS does not accept the Study Root C-GET model")
        scp_roles = sorted({UID(cx.abstract_syntax).name for cx in assoc.accepted_contexts if cx.as_scp})
        codes = [_status(status) for status, _ in assoc.send_c_get(_study_identifier(), model)]
    finally:
        _release(assoc)
    final = codes[-1] if codes else None
    details = [f"storage SCP role accepted for: {', '.join(scp_roles) or 'none'}"]
    if final is None:
        return ProbeResult(
            "C-GET",
            False,
            "the PACS aborted the C-GET without a status (it may require our AE title to be registered for retrieval)",
            details,
        )
    if final in (0x0000, 0xFF00, 0xA701, 0xA702, 0xC000) and scp_roles:
        return ProbeResult("C-GET", True, f"supported (answered {_hex(final)} for the probe's study)", details)
    if not scp_roles:
        return ProbeResult(
            "C-GET", False, "the PACS would not send instances back on our association (no SCP role accepted)", details
        )
    return ProbeResult("C-GET", None, f"answered {_hex(final)}", details)


def probe_storage(target: DimseTarget, *, timeout: float) -> ProbeResult:
    """Propose every (storage class, transfer syntax) pair, read what was accepted, release."""
    contexts = [(uid, [syntax]) for uid in STORAGE_SOP_CLASSES for syntax in PROBE_TRANSFER_SYNTAXES]
    try:
        assoc = associate(target, contexts, timeout=timeout)
    except AssociationRefused as exc:
        return ProbeResult("Storage SCP negotiation", False, str(exc))
    try:
        accepted: dict[str, list[str]] = {}
        for cx in assoc.accepted_contexts:
            accepted.setdefault(str(cx.abstract_syntax), []).append(UID(cx.transfer_syntax[0]).name)
    finally:
        _release(assoc)
    details = [f"{UID(uid).name}: {_syntaxes(accepted.get(uid, []))}" for uid in STORAGE_SOP_CLASSES]
    if SR_CLASS in accepted:
        return ProbeResult("Storage SCP negotiation", True, "accepts Comprehensive 3D SR (our result object)", details)
    return ProbeResult(
        "Storage SCP negotiation",
        False,
        "does not accept Comprehensive 3D SR: SR write-back by C-STORE will be refused",
        details,
    )


# --- the endpoint Test button ----------------------------------------------------------------


def probe_dicom_echo(
    *,
    host: str,
    port: int,
    called_ae_title: str,
    calling_ae_title: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    tls: bool = False,
) -> ProbeResult:
    """One association with a C-ECHO: what a PACS administrator means by "can we reach it"."""
    ae = AE(ae_title=calling_ae_title or settings.AE_TITLE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    connected: list[bool] = []
    started = time.perf_counter()
    assoc = ae.associate(
        host,
        port,
        ae_title=called_ae_title,
        tls_args=dicom_tls.client_tls_args(tls=tls, host=host),
        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay, [connected])],
    )
    seconds = 0.0

    def answer(ok: bool, summary: str, code: str = "", reason: str = "") -> ProbeResult:
        return ProbeResult("C-ECHO", ok, summary, code=code, reason=reason, seconds=seconds)

    try:
        if assoc.is_established:
            status = assoc.send_c_echo()
            seconds = time.perf_counter() - started
            if status is not None and "Status" in status:
                code = f"0x{int(status.Status):04X}"
                if status.Status == 0x0000:
                    return answer(True, f"C-ECHO accepted by {called_ae_title}", code)
                return answer(False, "C-ECHO answered with a failure status", code, "the peer refused the echo")
            return answer(False, "no C-ECHO response", "", "the association dropped or timed out")
        seconds = time.perf_counter() - started  # before the TLS diagnosis below, which connects again
        if assoc.is_rejected and assoc.acceptor.primitive is not None:
            rsp = assoc.acceptor.primitive
            result, source, diagnostic = rsp.result, rsp.result_source, rsp.diagnostic
            # An A-ASSOCIATE-RJ carries all three.
            assert result is not None and source is not None and diagnostic is not None
            outcome = classify_rejection(
                int(result),
                int(source),
                int(diagnostic),
                peer=f"{called_ae_title}@{host}:{port}",
                description=f"{rsp.result_str}, {rsp.source_str}: {rsp.reason_str}",
            )
            return answer(False, "association rejected", str(outcome.code), outcome.message)
        tls_args = dicom_tls.client_tls_args(tls=tls, host=host)
        problem = dicom_tls.handshake_problem(tls_args, host, port, timeout) if tls_args and not connected else None
        if problem:
            return answer(
                False,
                "TLS handshake failed",
                "",
                f"{problem}: check the CA file and the certificates "
                "on both sides (PACSLENS_DICOM_TLS_CA, PACSLENS_DICOM_TLS_CERT)",
            )
        if not connected:
            return answer(False, "cannot connect", "", f"nothing answers on {host}:{port} (refused or timed out)")
        return answer(False, "association aborted", "", "the peer aborted or did not answer the association request")
    finally:
        if assoc.is_established:
            assoc.release()


# --- helpers -----------------------------------------------------------------------------------


def _syntaxes(names: list[str]) -> str:
    if not names:
        return "not accepted"
    if len(names) == len(PROBE_TRANSFER_SYNTAXES):
        return "all proposed transfer syntaxes (uncompressed, deflate, JPEG lossless, JPEG-LS, JPEG 2000, RLE)"
    return ", ".join(names)


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


def _nodelay(event, connected: list[bool]) -> None:
    # As in results.deliver.dicom_send: without TCP_NODELAY, Nagle holds the small PDUs back.
    connected.append(True)
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
