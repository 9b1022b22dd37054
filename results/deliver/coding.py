"""A destination's coding profile as the builders take it, and the check that it builds.

`coding_snapshot(destination)` is what a new Delivery row keeps (its profile's values, or {}
for a destination without one, meaning the defaults). `fhir_settings`, `hl7_settings` and
`sr_codes` turn a snapshot into the builders' settings; missing keys fall back to the
builders' own defaults, which the CodingProfile model's defaults equal, so a destination
without a profile sends exactly what PacsLens sent before profiles existed.

`coding_profile_problems(profile, destination)` builds a sample HL7 message, FHIR resources or
SR with the profile and says what does not validate, so a site finds out on the form or at
YAML import, not in the failure queue.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from django.conf import settings
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from results.deliver.fhir import FHIRBuildError, FHIRSettings, build_imaging_study, build_observation
from results.deliver.hl7 import HL7BuildError, HL7Settings, MessageType, build_hl7_message
from results.deliver.payload import ResultIdentity, ResultPayload
from results.deliver.sr import SRBuildError, SRCodes, build_sr
from results.models import CodingProfile, Destination


def coding_profile(destination: Destination) -> CodingProfile:
    """The destination's profile; an unsaved one with the defaults when it has none."""
    try:
        return destination.coding_profile
    except CodingProfile.DoesNotExist:
        return CodingProfile(destination=destination)


# The HL7 link identity is the destination's, not the profile's, but a re-send must carry it
# as first sent too (MSH-3..6, the version, the message type, the accession field).
HL7_LINK_FIELDS = (
    "hl7_message_type",
    "hl7_version",
    "sending_application",
    "sending_facility",
    "receiving_application",
    "receiving_facility",
    "accession_field",
)


def coding_snapshot(destination: Destination) -> dict[str, Any]:
    """What a new delivery to `destination` keeps: its profile's fields for the destination's
    kind (none when it has no profile: the defaults), and for HL7 the link identity."""
    try:
        profile = destination.coding_profile
    except CodingProfile.DoesNotExist:
        snapshot = {}
    else:
        snapshot = {name: getattr(profile, name) for name in CodingProfile.fields_for_kind(destination.kind)}
    if destination.kind == "hl7":
        snapshot.update({name: getattr(destination, name) for name in HL7_LINK_FIELDS})
    return snapshot


def fhir_settings(coding: dict[str, Any]) -> FHIRSettings:
    defaults = FHIRSettings()
    return FHIRSettings(
        code_system=coding.get("fhir_code_system", defaults.code_system),
        score_code=coding.get("fhir_score_code", defaults.score_code),
        score_display=coding.get("fhir_score_display", defaults.score_display),
        flag_code=coding.get("fhir_flag_code", defaults.flag_code),
        flag_display=coding.get("fhir_flag_display", defaults.flag_display),
        patient_identifier_system=coding.get("fhir_patient_identifier_system", defaults.patient_identifier_system),
        accession_identifier_system=coding.get(
            "fhir_accession_identifier_system", defaults.accession_identifier_system
        ),
        study_identifier_system=coding.get("fhir_study_identifier_system", defaults.study_identifier_system),
        result_extension_url=coding.get("fhir_result_extension_url", defaults.result_extension_url),
    )


def fhir_observation_system(destination: Destination) -> str:
    """The system a new FHIR delivery's Observation identifier is minted under ("" = urn:uuid)."""
    return coding_profile(destination).fhir_observation_identifier_system or settings.FHIR_IDENTIFIER_SYSTEM


def hl7_settings(destination: Destination, coding: dict[str, Any]) -> HL7Settings:
    """The link identity (MSH-3..6, version, accession field) and the profile's coding, as the
    delivery recorded them; rows from before profiles recorded neither: the destination's now."""
    defaults = HL7Settings()
    order_numbers = coding.get("hl7_order_number_fields", "")

    def link(name: str) -> str:
        return coding.get(name, getattr(destination, name))

    return HL7Settings(
        sending_application=link("sending_application") or defaults.sending_application,
        sending_facility=link("sending_facility"),
        receiving_application=link("receiving_application"),
        receiving_facility=link("receiving_facility"),
        version=link("hl7_version") or defaults.version,
        accession_field=link("accession_field") or defaults.accession_field,
        patient_id_authority=coding.get("hl7_patient_id_authority", defaults.patient_id_authority),
        patient_id_type=coding.get("hl7_patient_id_type", defaults.patient_id_type),
        order_number_fields=tuple(part.strip() for part in order_numbers.split(",") if part.strip()),
        order_control=coding.get("hl7_order_control", defaults.order_control),
        service=(
            coding.get("hl7_service_code", defaults.service[0]),
            coding.get("hl7_service_text", defaults.service[1]),
            coding.get("hl7_service_coding_system", defaults.service[2]),
        ),
        score_code=(
            coding.get("hl7_score_code", defaults.score_code[0]),
            coding.get("hl7_score_text", defaults.score_code[1]),
            coding.get("hl7_coding_system", defaults.score_code[2]),
        ),
        flag_code=(
            coding.get("hl7_flag_code", defaults.flag_code[0]),
            coding.get("hl7_flag_text", defaults.flag_code[1]),
            coding.get("hl7_coding_system", defaults.flag_code[2]),
        ),
        result_status=coding.get("hl7_result_status", defaults.result_status),
        study_uid=coding.get("hl7_study_uid", defaults.study_uid),
    )


def hl7_message_type(destination: Destination, coding: dict[str, Any]) -> MessageType:
    # Destination.hl7_message_type's choices are exactly the MessageType values.
    return "ORM^O01" if coding.get("hl7_message_type", destination.hl7_message_type) == "ORM^O01" else "ORU^R01"


def sr_codes(coding: dict[str, Any]) -> SRCodes:
    defaults = SRCodes()
    return SRCodes(
        scheme_designator=coding.get("sr_scheme_designator", defaults.scheme_designator),
        scheme_name=coding.get("sr_scheme_name", defaults.scheme_name),
        scheme_organization=coding.get("sr_scheme_organization", defaults.scheme_organization),
        scheme_version=coding.get("sr_scheme_version", defaults.scheme_version),
        score_code=coding.get("sr_score_code", defaults.score_code),
        score_meaning=coding.get("sr_score_meaning", defaults.score_meaning),
        flag_code=coding.get("sr_flag_code", defaults.flag_code),
        flag_meaning=coding.get("sr_flag_meaning", defaults.flag_meaning),
    )


def coding_profile_problems(profile: CodingProfile, destination: Destination) -> list[str]:
    """Build what `destination` would send with `profile` for a made-up result; one line per
    problem (empty when everything validates). The sample holds no patient data."""
    coding = profile.snapshot()
    payload = _sample_payload()
    try:
        if destination.kind == "hl7":
            build_hl7_message(
                payload,
                message_type=hl7_message_type(destination, coding),
                control_id="SAMPLE",
                settings=hl7_settings(destination, coding),
            )
        elif destination.kind == "fhir":
            fhir = fhir_settings(coding)
            build_observation(payload, fhir)
            build_imaging_study(payload, fhir, observation_id="sample")
        elif destination.kind in ("dicom", "dicomweb"):
            build_sr(payload, sr_codes=sr_codes(coding))
    except (HL7BuildError, FHIRBuildError, SRBuildError) as exc:
        return [f"a sample result does not build with this profile: {exc}"]
    except ValueError as exc:  # a settings value the builders refuse (e.g. a designator not 99...)
        return [str(exc)]
    return []


def _sample_payload() -> ResultPayload:
    study = "2.25.1"
    source = Dataset()
    source.SOPClassUID = CTImageStorage
    source.SOPInstanceUID = "2.25.3"
    source.StudyInstanceUID = study
    source.SeriesInstanceUID = "2.25.2"
    source.Modality = "CT"
    source.PatientID = "SAMPLE"
    source.PatientName = "Sample^Patient"
    source.PatientBirthDate = ""
    source.PatientSex = ""
    source.StudyDate = "20240101"
    source.StudyTime = "120000"
    source.StudyID = "1"
    source.AccessionNumber = "SAMPLE1"
    source.ReferringPhysicianName = ""
    return ResultPayload(
        study_instance_uid=study,
        accession_number="SAMPLE1",
        patient_id="SAMPLE",
        patient_name="Sample^Patient",
        triage_score=0.5,
        finding_flag=True,
        model_name="sample",
        model_version="1",
        identity=ResultIdentity(installation=uuid.UUID(int=1), result=uuid.UUID(int=2)),
        created_at=dt.datetime(2024, 1, 1, 12, 0, tzinfo=dt.UTC),
        source_instances=(source,),
    )
