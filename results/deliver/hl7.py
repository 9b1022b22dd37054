"""HL7 v2 result messages for the RIS and the MLLP client that delivers them.

`build_hl7_message(payload, message_type=..., control_id=..., settings=...)` returns ER7 text
(segments separated by CR) for ORU^R01 (the result: score OBX NM, finding OBX CWE/CE, OBX-11
P or F) or ORM^O01 (the "ORM extension": ORC-1 XO/SC with the order's priority raised), built
and then strictly re-parsed and validated with hl7apy. `send_mllp(...)` frames it, waits for
the ACK and classifies it; the AE/AR policy is the destination's (receivers differ).

MSH-10 is the caller's: one control id per delivery, reused on every re-send, so the RIS can
recognise a duplicate and the ACK can be matched to what we sent.

Field choices (defaults in `HL7Settings`, per destination):
- accession number: OBR-18 (Placer Field 1, where IHE radiology puts it); or OBR-2, OBR-3,
  ORC-2, ORC-3 via `accession_field`; copied as order number into `order_number_fields`
  (ORC-2/3, OBR-2/3, OBR-19) where the RIS matches on those.
- patient id: PID-3 (CX: id^^^assigning authority^identifier type); name: PID-5 from DICOM PN.
- result status (OBR-25, OBX-11): the profile's (P by default); F once the result is final.
- Study Instance UID (`study_uid`): not sent; a ZDS segment (IHE scheduled workflow's
  `ZDS|<UID>^<sending application>^Application^DICOM`, last in the message); or an OBX coded
  DCM 110180 of type RP (the same reference pointer) or ST (the bare UID).
The whole mapping, with example messages, is in docs/hl7-mapping.md.
- priority: ORC-7.6 and OBR-27.6 (TQ "S"/"R"). ORM^O01 has no TQ1 segment in 2.5/2.5.1, and
  ORC-7/OBR-27 are retained there for backward compatibility, so ORM always uses them; ORU in
  2.5+ also carries TQ1-9 (S^Stat^HL70485 / R^Routine^HL70485).
- model identity: an NTE after the score OBX (ORU) or after OBR (ORM).
"""

from __future__ import annotations

import datetime as dt
import socket
import time
from dataclasses import dataclass
from typing import Literal

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Segment
from hl7apy.parser import parse_message, parse_segment

from results.deliver.payload import Outcome, OutcomeKind, Protocol, ResultPayload

MessageType = Literal["ORU^R01", "ORM^O01"]
SUPPORTED_VERSIONS = ("2.3", "2.4", "2.5", "2.5.1")
ACCESSION_FIELDS = {
    "OBR-18": ("OBR", 18),
    "OBR-2": ("OBR", 2),
    "OBR-3": ("OBR", 3),
    "ORC-2": ("ORC", 2),
    "ORC-3": ("ORC", 3),
}
# Order-number fields that may carry a copy of the accession number (placer, filler, placer field 2).
ORDER_NUMBER_FIELDS = {
    "ORC-2": ("ORC", 2),
    "ORC-3": ("ORC", 3),
    "OBR-2": ("OBR", 2),
    "OBR-3": ("OBR", 3),
    "OBR-19": ("OBR", 19),
}
STUDY_UID_PLACEMENTS = ("", "zds", "obx-rp", "obx-st")
# DICOM's own code for the concept (PS3.16 CID 7xxx "Study Instance UID").
STUDY_UID_CODE = ("110180", "Study Instance UID", "DCM")
START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\x0d"
# An ACK is a few hundred bytes; a peer that sends more without an end block is not answering.
MAX_ACK_BYTES = 1024 * 1024


class HL7BuildError(ValueError):
    """The message cannot be built or does not validate: permanent for this result."""


class AckTooLarge(Exception):
    """The peer sent more than MAX_ACK_BYTES without closing the frame."""


@dataclass(frozen=True)
class HL7Settings:
    """Per-destination message settings."""

    sending_application: str = "PACSLENS"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    version: str = "2.5.1"
    processing_id: str = "P"
    accession_field: str = "OBR-18"
    patient_id_authority: str = ""
    patient_id_type: str = ""
    # Fields that also carry the accession number (as placer / filler order number).
    order_number_fields: tuple[str, ...] = ()
    # OBR-25 / OBX-11 of a result not (yet) final: P, or F where the site sends final results.
    result_status: str = "P"
    study_uid: str = ""  # one of STUDY_UID_PLACEMENTS
    # ORM^O01 ORC-1: XO (change order) or SC (status changed).
    order_control: str = "XO"
    # OBR-4 universal service identifier (code, text, coding system); sites may map their own.
    service: tuple[str, str, str] = ("PACSLENS-AI", "PacsLens AI triage", "L")
    score_code: tuple[str, str, str] = ("PL0001", "AI triage score", "99PACSLENS")
    flag_code: tuple[str, str, str] = ("PL0002", "AI triage finding", "99PACSLENS")

    def __post_init__(self) -> None:
        if self.version not in SUPPORTED_VERSIONS:
            raise ValueError(f"HL7 version must be one of {', '.join(SUPPORTED_VERSIONS)}")
        if self.accession_field not in ACCESSION_FIELDS:
            raise ValueError(f"accession_field must be one of {', '.join(ACCESSION_FIELDS)}")
        if self.order_control not in ("XO", "SC"):
            raise ValueError("order_control must be XO or SC")
        unknown = set(self.order_number_fields) - set(ORDER_NUMBER_FIELDS)
        if unknown:
            raise ValueError(f"order_number_fields must be among {', '.join(ORDER_NUMBER_FIELDS)}")
        if self.result_status not in ("P", "F"):
            raise ValueError("result_status must be P or F")
        if self.study_uid not in STUDY_UID_PLACEMENTS:
            raise ValueError(f"study_uid must be one of {', '.join(STUDY_UID_PLACEMENTS)}")


def build_hl7_message(
    payload: ResultPayload,
    *,
    message_type: MessageType,
    control_id: str,
    settings: HL7Settings = HL7Settings(),
) -> str:
    """ER7 text of the message; raises HL7BuildError (without patient data) when invalid."""
    if not control_id or len(control_id) > 20:
        raise HL7BuildError("MSH-10 control id must be 1-20 characters")
    version = settings.version
    try:
        segments = [_msh(payload, message_type, control_id, settings), _pid(payload, settings)]
        if message_type == "ORU^R01":
            segments += _oru_order(payload, settings)
        elif message_type == "ORM^O01":
            segments += _orm_order(payload, settings)
        else:
            raise HL7BuildError(f"unsupported message type {message_type}")
        er7 = "\r".join(segment if isinstance(segment, str) else segment.to_er7() for segment in segments)
    except HL7BuildError:
        raise
    except Exception as exc:
        # hl7apy's messages quote the offending value, which may be patient data.
        # `from None`: a chained cause would carry the value into tracebacks in the logs.
        raise HL7BuildError(f"cannot build {message_type} {control_id}: {type(exc).__name__}") from None
    validate_hl7(er7, version=version, control_id=control_id)
    return er7


def validate_hl7(er7: str, *, version: str, control_id: str = "") -> None:
    """Strictly re-parse (groups found from the message structure) and validate.

    Z segments (ZDS) are site-defined, so no standard says what they hold: hl7apy would drop a
    trailing one silently when it finds groups, and refuse components in it when it does not.
    They must come last; each is checked for being a well-formed segment on its own, the rest
    of the message strictly as before."""
    names = [segment[:3] for segment in er7.split("\r") if segment]
    z_segments = [segment for segment in er7.split("\r") if segment.startswith("Z")]
    if z_segments and any(not name.startswith("Z") for name in names[len(names) - len(z_segments) :]):
        raise HL7BuildError(f"HL7 message {control_id}: Z segments must come last")
    try:
        for segment in z_segments:
            parse_segment(segment, version=version, validation_level=VALIDATION_LEVEL.TOLERANT)
        standard = "\r".join(segment for segment in er7.split("\r") if not segment.startswith("Z"))
        message = parse_message(standard, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        if message.msh.msh_9.msh_9_1.value == "ORM":
            # hl7apy models ORM^O01's order-detail CHOICE (OBR | RQD | RQ1 | RXO | ODS | ODT)
            # as a sequence and so demands all six; validate the segments and check the
            # structure ourselves instead.
            _validate_segments(message)
            _check_orm_structure(standard)
        else:
            message.validate()
    except HL7BuildError:
        raise
    except Exception as exc:
        raise HL7BuildError(f"HL7 {version} message {control_id} does not validate: {type(exc).__name__}") from None
    if message.version != version or message.msh.msh_10.value != control_id:
        raise HL7BuildError(f"HL7 message {control_id} did not re-parse to what was built")


def _validate_segments(element: object) -> None:
    for child in getattr(element, "children", []):
        if child.classname == "Segment":
            child.validate()
        else:
            _validate_segments(child)


def _check_orm_structure(er7: str) -> None:
    names = [segment[:3] for segment in er7.split("\r") if segment]
    if names[:4] != ["MSH", "PID", "ORC", "OBR"] or not set(names[4:]) <= {"NTE", "OBX"}:
        raise HL7BuildError(f"ORM^O01 segments out of order: {'-'.join(names)}")


@dataclass(frozen=True)
class AckPolicy:
    """What an error or reject acknowledgement means at this destination."""

    on_error: OutcomeKind = OutcomeKind.PERMANENT  # AE / CE: usually a content error
    on_reject: OutcomeKind = OutcomeKind.TRANSIENT  # AR / CR: often a system problem


@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1
    control_id: str  # MSA-2
    error_code: str = ""  # ERR-3.1 (2.5+) or MSA-6.1; never the free text, which may name the patient


def send_mllp(
    host: str,
    port: int,
    message: str,
    *,
    control_id: str,
    policy: AckPolicy = AckPolicy(),
    ack_timeout: float = 10.0,
    connect_timeout: float = 5.0,
) -> Outcome:
    """Send one framed message and classify its ACK. Never raises for network trouble."""
    peer = f"{host}:{port}"
    frame = START_BLOCK + message.encode("utf-8") + END_BLOCK
    try:
        with socket.create_connection((host, port), timeout=connect_timeout) as sock:
            # A message is one small write followed by waiting for the reply: Nagle plus the
            # peer's delayed ACK would add up to ~40 ms per message.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(frame)
            raw = _read_frame(sock, ack_timeout)
    except TimeoutError:
        return _outcome(OutcomeKind.TRANSIENT, None, f"no ACK from {peer} in {ack_timeout:g} s", control_id)
    except AckTooLarge:
        return _outcome(
            OutcomeKind.TRANSIENT, None, f"{peer} sent over {MAX_ACK_BYTES} bytes without an MLLP end block", control_id
        )
    except OSError as exc:
        return _outcome(OutcomeKind.TRANSIENT, None, f"MLLP to {peer} failed: {type(exc).__name__}", control_id)
    if raw is None:
        return _outcome(OutcomeKind.TRANSIENT, None, f"{peer} closed the connection without an ACK", control_id)
    ack = parse_ack(raw)
    if ack is None:
        return _outcome(OutcomeKind.TRANSIENT, None, f"{peer} answered without an MSA segment", control_id)
    return classify_ack(ack, control_id=control_id, policy=policy, peer=peer)


def classify_ack(ack: Ack, *, control_id: str, policy: AckPolicy, peer: str) -> Outcome:
    if ack.control_id != control_id:
        # An ACK for another message proves nothing about ours: count it as no ACK.
        return _outcome(
            OutcomeKind.TRANSIENT, ack.code, f"{peer} acknowledged {ack.control_id!r}, not {control_id!r}", control_id
        )
    detail = f" (error code {ack.error_code})" if ack.error_code else ""
    if ack.code in ("AA", "CA"):
        return _outcome(OutcomeKind.SUCCESS, ack.code, f"accepted by {peer}", control_id)
    if ack.code in ("AE", "CE"):
        return _outcome(policy.on_error, ack.code, f"{peer} answered error{detail}", control_id)
    if ack.code in ("AR", "CR"):
        return _outcome(policy.on_reject, ack.code, f"{peer} rejected the message{detail}", control_id)
    return _outcome(OutcomeKind.TRANSIENT, ack.code, f"{peer} sent an unknown ACK code", control_id)


def parse_ack(raw: bytes) -> Ack | None:
    """Read MSA (and ERR) by hand: receivers' ACKs vary too much for strict parsing."""
    text = raw.decode("utf-8", errors="replace").strip("\x0b\x1c\r\n")
    segments = [segment for segment in text.replace("\n", "\r").split("\r") if segment]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        return None
    field_separator, component_separator = segments[0][3], segments[0][4]
    fields = {segment[:3]: segment.split(field_separator) for segment in reversed(segments)}
    msa = fields.get("MSA")
    if msa is None or len(msa) < 3:
        return None
    error_code = ""
    err = fields.get("ERR")
    if err is not None and len(err) > 3 and err[3]:
        error_code = err[3].split(component_separator)[0]
    elif len(msa) > 6 and msa[6]:
        error_code = msa[6].split(component_separator)[0]
    # Bounded: they go into the delivery's record (code is a 40-character column) and its messages.
    return Ack(code=msa[1].strip()[:8], control_id=msa[2].strip()[:40], error_code=error_code.strip()[:20])


def frame(message: str) -> bytes:
    return START_BLOCK + message.encode("utf-8") + END_BLOCK


def _read_frame(sock: socket.socket, timeout: float) -> bytes | None:
    deadline = time.monotonic() + timeout
    buffer = bytearray()
    end = -1
    while end < 0:
        if len(buffer) > MAX_ACK_BYTES:
            raise AckTooLarge
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            return None
        searched = max(0, len(buffer) - 1)  # an end block may straddle two reads
        buffer += chunk
        end = buffer.find(END_BLOCK, searched)
    start = buffer.find(START_BLOCK, 0, end)
    return bytes(buffer[start + 1 if start >= 0 else 0 : end])


def _outcome(kind: OutcomeKind, code: str | None, message: str, key: str) -> Outcome:
    return Outcome(kind=kind, protocol=Protocol.HL7, code=code, message=message, key=key)


# --- Segments --------------------------------------------------------------------------------


def _msh(payload: ResultPayload, message_type: MessageType, control_id: str, settings: HL7Settings) -> Segment:
    msh = _segment("MSH", settings)
    # A standalone MSH (outside a Message) does not get the delimiters by itself.
    msh.msh_1 = "|"
    msh.msh_2 = "^~\\&"
    msh.msh_3 = _escape(settings.sending_application)
    msh.msh_4 = _escape(settings.sending_facility)
    msh.msh_5 = _escape(settings.receiving_application)
    msh.msh_6 = _escape(settings.receiving_facility)
    # The result's time, not the send time: a re-send is the same message.
    msh.msh_7 = _timestamp(payload.created_at)
    code, trigger = message_type.split("^")
    # The message structure component exists from 2.3.1 on.
    msh.msh_9 = f"{code}^{trigger}" if settings.version == "2.3" else f"{code}^{trigger}^{code}_{trigger}"
    msh.msh_10 = _escape(control_id)
    msh.msh_11 = settings.processing_id
    msh.msh_12 = settings.version
    if not _is_ascii(payload.patient_name, payload.patient_id, payload.accession_number):
        msh.msh_18 = "UNICODE UTF-8"
    return msh


def _pid(payload: ResultPayload, settings: HL7Settings) -> Segment:
    pid = _segment("PID", settings)
    pid.pid_1 = "1"
    cx = [
        _escape(payload.patient_id),
        "",
        "",
        _escape(settings.patient_id_authority),
        _escape(settings.patient_id_type),
    ]
    pid.pid_3 = "^".join(cx).rstrip("^")
    # DICOM PN: family^given^middle^prefix^suffix, optionally "=ideographic=phonetic" groups;
    # XPN has the same first five components, so escape each and keep the alphabetic group.
    alphabetic = payload.patient_name.split("=")[0]
    pid.pid_5 = "^".join(_escape(part) for part in alphabetic.split("^")[:5]).rstrip("^") or '""'
    return pid


def _oru_order(payload: ResultPayload, settings: HL7Settings) -> list[Segment | str]:
    status = "F" if payload.is_final else settings.result_status
    orc = _segment("ORC", settings)
    orc.orc_1 = "RE"  # observations to follow
    obr = _obr(payload, settings)
    if ACCESSION_FIELDS[settings.accession_field][0] == "ORC":
        _set_accession(orc, payload, settings)
    _set_order_numbers(orc, obr, payload, settings)
    obr.obr_22 = _timestamp(payload.created_at)
    obr.obr_25 = status
    segments = [orc, obr]
    if settings.version in ("2.5", "2.5.1"):
        tq1 = _segment("TQ1", settings)
        tq1.tq1_1 = "1"
        tq1.tq1_9 = "S^Stat^HL70485" if payload.priority.hl7_code == "S" else "R^Routine^HL70485"
        segments.append(tq1)
    else:
        # Before 2.5 the quantity/timing field carries the priority (6th component).
        orc.orc_7 = obr.obr_27 = f"^^^^^{payload.priority.hl7_code}"
    score = _segment("OBX", settings)
    score.obx_1, score.obx_2 = "1", "NM"
    score.obx_3 = _coded(settings.score_code)
    score.obx_5 = f"{payload.triage_score:.4f}"
    score.obx_6 = "{score}^score^UCUM"
    score.obx_11 = status
    score.obx_14 = _timestamp(payload.created_at)
    flag = _segment("OBX", settings)
    # CWE exists as an OBX value type from 2.5; CE before.
    flag.obx_1, flag.obx_2 = "2", "CWE" if settings.version in ("2.5", "2.5.1") else "CE"
    flag.obx_3 = _coded(settings.flag_code)
    flag.obx_5 = "Y^Yes^HL70136" if payload.finding_flag else "N^No^HL70136"
    flag.obx_11 = status
    flag.obx_14 = _timestamp(payload.created_at)
    return [*segments, score, _model_note(payload, settings), flag, *_study_uid(payload, settings, "3", status)]


def _orm_order(payload: ResultPayload, settings: HL7Settings) -> list[Segment | str]:
    orc = _segment("ORC", settings)
    orc.orc_1 = settings.order_control
    orc.orc_7 = f"^^^^^{payload.priority.hl7_code}"
    orc.orc_9 = _timestamp(payload.created_at)
    orc.orc_16 = "AITRIAGE^PacsLens AI triage^L"
    obr = _obr(payload, settings)
    obr.obr_27 = f"^^^^^{payload.priority.hl7_code}"
    field_segment, _ = ACCESSION_FIELDS[settings.accession_field]
    if field_segment == "ORC":
        _set_accession(orc, payload, settings)
    _set_order_numbers(orc, obr, payload, settings)
    status = "F" if payload.is_final else settings.result_status
    return [orc, obr, _model_note(payload, settings), *_study_uid(payload, settings, "1", status)]


def _obr(payload: ResultPayload, settings: HL7Settings) -> Segment:
    obr = _segment("OBR", settings)
    obr.obr_1 = "1"
    obr.obr_4 = _coded(settings.service)
    obr.obr_7 = _timestamp(payload.created_at)
    if ACCESSION_FIELDS[settings.accession_field][0] == "OBR":
        _set_accession(obr, payload, settings)
    return obr


def _set_accession(segment: Segment, payload: ResultPayload, settings: HL7Settings) -> None:
    name, number = ACCESSION_FIELDS[settings.accession_field]
    setattr(segment, f"{name.lower()}_{number}", _escape(payload.accession_number))


def _set_order_numbers(orc: Segment, obr: Segment, payload: ResultPayload, settings: HL7Settings) -> None:
    for field_name in settings.order_number_fields:
        name, number = ORDER_NUMBER_FIELDS[field_name]
        # EI: the entity identifier is the first component.
        setattr(orc if name == "ORC" else obr, f"{name.lower()}_{number}", _escape(payload.accession_number))


def _study_uid(payload: ResultPayload, settings: HL7Settings, set_id: str, status: str) -> list[Segment | str]:
    """The Study Instance UID where the profile wants it: nothing, a ZDS, or an OBX (RP or ST)."""
    uid = payload.study_instance_uid
    # RP: pointer ^ application id (HD) ^ type of data ^ subtype, as IHE SWF's ZDS-1.
    pointer = f"{_escape(uid)}^{_escape(settings.sending_application)}^Application^DICOM"
    if settings.study_uid == "zds":
        # hl7apy types an unknown Z segment's fields as ST (one component): written as text.
        return [f"ZDS|{pointer}"]
    if settings.study_uid in ("obx-rp", "obx-st"):
        obx = _segment("OBX", settings)
        obx.obx_1 = set_id
        obx.obx_2 = "RP" if settings.study_uid == "obx-rp" else "ST"
        obx.obx_3 = _coded(STUDY_UID_CODE)
        obx.obx_5 = pointer if settings.study_uid == "obx-rp" else _escape(uid)
        obx.obx_11 = status
        return [obx]
    return []


def _model_note(payload: ResultPayload, settings: HL7Settings) -> Segment:
    nte = _segment("NTE", settings)
    nte.nte_1 = "1"
    nte.nte_2 = "L"  # source: ancillary (filler) department
    flag = "finding present" if payload.finding_flag else "no finding"
    nte.nte_3 = _escape(
        f"PacsLens AI triage score {payload.triage_score:.4f}, {flag}; "
        f"model {payload.model_name} {payload.model_version}; demonstration unless validated"
    )
    return nte


def _segment(name: str, settings: HL7Settings) -> Segment:
    return Segment(name, version=settings.version, validation_level=VALIDATION_LEVEL.STRICT)


def _coded(code: tuple[str, str, str]) -> str:
    return "^".join(_escape(part) for part in code)


def _timestamp(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S+0000")


def _escape(value: str) -> str:
    # ER7 escape sequences (HL7 v2 2.7): the escape character first, then the delimiters.
    return (
        value.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("&", "\\T\\")
        .replace("~", "\\R\\")
        .replace("\r", "\\X0D\\")
        .replace("\n", "\\X0A\\")
    )


def _is_ascii(*values: str) -> bool:
    return all(value.isascii() for value in values)
