"""What a result delivery sends, and what came of sending it.

These are plain values, free of Django models, so the payload builders (sr, hl7, fhir) and the
protocol clients (dicom_send, stow_client, hl7, fhir) can be tested against real peers on their
own, and the delivery ledger can record an `Outcome` per attempt without knowing the protocol.

Patient data (name, id, the source datasets) is kept out of `repr()` because payloads and
outcomes end up in log lines and exception messages.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_ROOT_UID, UID, generate_uid


class Priority(enum.StrEnum):
    """Worklist priority the result asks for; each protocol spells it its own way."""

    STAT = "stat"
    ROUTINE = "routine"

    @property
    def hl7_code(self) -> str:
        # HL7 v2 table 0027 (ORC-7.6 / OBR-27.6 / TQ1-9): S stat, R routine.
        return "S" if self is Priority.STAT else "R"

    @property
    def fhir_code(self) -> str:
        # FHIR request-priority value set: routine | urgent | asap | stat.
        return self.value


@dataclass(frozen=True)
class ResultIdentity:
    """Where every identifier of one result's outgoing objects comes from.

    `installation` is this gateway's identity (made once per database, kept in its backups);
    `result` is a random UUID drawn when the result row was written. Every UID and identifier
    derives from both, so it is the same on every re-send of this result and different from
    anything another installation, a reinstalled one, or a copy of this database mints: the
    random result UUID alone is 122 bits, whatever the row ids are.

    `uid_root` is a site's own org root for DICOM UIDs ("" = the UUID-derived root 2.25, which
    needs no registration). `legacy_seed` is set only for results delivered before identities
    existed: they keep deriving exactly the identifiers they were first delivered with.
    """

    installation: uuid.UUID
    result: uuid.UUID
    uid_root: str = ""
    legacy_seed: str = ""

    def uid(self, purpose: str) -> UID:
        """A DICOM UID for this result and purpose (SR SOP instance, series, tracking...)."""
        if self.legacy_seed:
            return derive_uid(self.legacy_seed, purpose)
        return self._uid_for(self._uuid(f"result/{self.result}/{purpose}"))

    def device_uid(self, model_name: str, model_version: str) -> UID:
        """The model as a device of this installation: one UID per installation and model version."""
        if self.legacy_seed:
            return derive_uid(f"model\x00{model_name}", model_version)
        return self._uid_for(self._uuid(f"model/{model_name}\x00{model_version}"))

    def urn(self, purpose: str) -> str:
        """A `urn:uuid:` URI for this result and purpose (FHIR identifiers)."""
        if self.legacy_seed:
            # As delivered before identities existed: a URN of the legacy OID.
            return f"urn:oid:{derive_uid(self.legacy_seed, purpose)}"
        return self._uuid(f"result/{self.result}/{purpose}").urn

    def _uuid(self, name: str) -> uuid.UUID:
        # RFC 9562 name-based UUID in the installation's namespace.
        return uuid.uuid5(self.installation, name)

    def _uid_for(self, derived: uuid.UUID) -> UID:
        if self.uid_root:
            return derive_uid(derived.hex, "", prefix=f"{self.uid_root}.")
        return UID(f"2.25.{derived.int}")  # PS3.5 B.2: a UUID as a UID


@dataclass(frozen=True)
class ResultPayload:
    """Everything the SR, HL7 and FHIR builders need about one inference result."""

    study_instance_uid: str
    accession_number: str = field(repr=False)
    patient_id: str = field(repr=False)
    # Only ever written into the SR/HL7 bodies; never logged, hence repr=False.
    patient_name: str = field(repr=False)
    triage_score: float
    finding_flag: bool
    model_name: str
    model_version: str
    # Every UID and identifier of the outgoing objects derives from it, so a re-send is the
    # same object and receivers keep one copy.
    identity: ResultIdentity
    created_at: dt.datetime
    priority: Priority = Priority.ROUTINE
    # Source instances for the SR's evidence and image library: datasets (pixel data not
    # needed) or paths to Part 10 files. Not needed for HL7/FHIR.
    source_instances: tuple[Dataset | Path, ...] = field(default=(), repr=False)
    # The result is preliminary until a radiologist confirms it; sites may send final.
    is_final: bool = False
    # For the summary image and the key object selection (results/deliver/summary.py): the
    # key slice (a dataset with pixels, or its Part 10 file), the flagged region's bounding
    # box on it (row0, col0, row1, col1, inclusive; None: nothing to outline) and the finding.
    key_image: Dataset | Path | None = field(default=None, repr=False)
    key_bbox: tuple[int, int, int, int] | None = None
    finding: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.triage_score <= 1.0:
            raise ValueError(f"triage_score must be within 0..1, got {self.triage_score!r}")
        if self.created_at.tzinfo is None:
            raise ValueError("created_at must be timezone-aware")

    def derived_uid(self, purpose: str) -> UID:
        """A UID that is the same for this result and purpose on every call and every host."""
        return self.identity.uid(purpose)

    @property
    def sr_sop_instance_uid(self) -> UID:
        return self.derived_uid(SR_SOP_INSTANCE)

    @property
    def sr_series_instance_uid(self) -> UID:
        return self.derived_uid("sr-series")

    @property
    def fhir_observation_identifier(self) -> tuple[str, str]:
        """(system, value) of the FHIR Observation under the URI system; the ledger may choose a
        site's own system instead (see fhir_observation_identifier)."""
        return fhir_observation_identifier(self.identity)


# Purposes of derived identifiers. The delivery ledger stores the same values as idempotency keys.
SR_SOP_INSTANCE = "sr-sop-instance"
# The summary image and key object selection sent beside the SR, in series of their own.
SUMMARY_SOP_INSTANCE = "sc-sop-instance"
SUMMARY_SERIES = "sc-series"
KOS_SOP_INSTANCE = "kos-sop-instance"
KOS_SERIES = "kos-series"
FHIR_OBSERVATION = "fhir-observation"
URI_SYSTEM = "urn:ietf:rfc:3986"  # FHIR's system for identifiers that are URIs (urn:uuid:...)


def fhir_observation_identifier(identity: ResultIdentity, *, system: str = "") -> tuple[str, str]:
    """Under a site's own `system` the value is the bare UUID; otherwise the urn:uuid URI."""
    urn = identity.urn(FHIR_OBSERVATION)
    if system and not identity.legacy_seed:
        return system, urn.removeprefix("urn:uuid:")
    return URI_SYSTEM, urn


def derive_uid(seed: str, purpose: str, *, prefix: str = PYDICOM_ROOT_UID) -> UID:
    # generate_uid concatenates its entropy sources without a separator, so "ab"+"c" would
    # collide with "a"+"bc"; the separator keeps seed and purpose apart. prefix must not be
    # None: generate_uid then ignores the entropy and returns a random 2.25 UUID UID.
    return generate_uid(prefix=prefix, entropy_srcs=[f"{seed}\x00{purpose}"])


class OutcomeKind(enum.StrEnum):
    SUCCESS = "success"
    # Worth retrying later: peer down, timeout, out of resources, 5xx, rejected-transient.
    TRANSIENT = "transient"
    # This object will never be accepted as is: invalid SR, SOP class not supported, AE/AR by
    # policy, 409/412/422. Goes to the failure queue.
    PERMANENT = "permanent"
    # The destination's configuration is wrong (AE title unknown, 401/403): retrying the same
    # configuration cannot help, staff must fix the destination.
    CONFIG_ERROR = "config_error"
    # The OAuth token endpoint was unreachable or refused our client: the fix is at the identity
    # provider, and once it is made deliveries flow again, so it is retried like a transient one.
    TOKEN_ERROR = "token_error"


class Protocol(enum.StrEnum):
    DICOM = "dicom"
    DICOMWEB = "dicomweb"
    HL7 = "hl7"
    FHIR = "fhir"


@dataclass(frozen=True)
class Outcome:
    """The result of sending one object (or one association/request that failed for all).

    `code` is what the peer said: DIMSE status int, HL7 ACK code ("AA", "AE", ...), or HTTP
    status int; for a rejected association the A-ASSOCIATE-RJ triple as text
    ("A-ASSOCIATE-RJ 1/1/3" = result/source/reason); None when there was no answer (refused connection, timeout). `message` never
    contains patient data: UIDs, AE titles, hosts and codes only.
    """

    kind: OutcomeKind
    protocol: Protocol
    code: int | str | None
    message: str
    # The idempotency key of the object this outcome is about (SOP Instance UID, MSH-10,
    # FHIR identifier value) when known.
    key: str = ""
    # Set for successes that carried a warning (DIMSE 0xB000..., STOW Warning Reason).
    warning: str = ""

    @property
    def ok(self) -> bool:
        return self.kind is OutcomeKind.SUCCESS

    @property
    def retryable(self) -> bool:
        return self.kind in (OutcomeKind.TRANSIENT, OutcomeKind.TOKEN_ERROR)

    def describe(self) -> str:
        code = _format_code(self.protocol, self.code)
        parts = [f"{self.protocol.value} {self.kind.value}"]
        if code:
            parts.append(code)
        parts.append(self.message)
        if self.warning:
            parts.append(f"warning: {self.warning}")
        return ": ".join(parts)


def _format_code(protocol: Protocol, code: int | str | None) -> str:
    if code is None:
        return ""
    if protocol is Protocol.DICOM and isinstance(code, int):
        return f"status 0x{code:04X}"
    if isinstance(code, int):
        return f"HTTP {code}"
    if protocol is Protocol.HL7:
        return f"ACK {code}"
    return code


def all_ok(outcomes: Sequence[Outcome]) -> bool:
    return bool(outcomes) and all(outcome.ok for outcome in outcomes)
