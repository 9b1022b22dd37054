"""The DICOM SR that carries a result into the PACS study (TID 1500 Measurement Report).

`build_sr(payload)` returns a validated Comprehensive 3D SR dataset; `sr_to_bytes` gives its
Part 10 encoding for STOW-RS. The SOP Instance and Series UIDs derive from the payload's
result identity (results/deliver/identity.py), so a re-send is the same object and the PACS keeps one
copy, and no other result of any installation has them.

highdicom is imported at module import on purpose: its import costs ~0.3 s, paid once per
worker rather than once per delivery.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian

from pacslens import __version__
from results.deliver.payload import ResultPayload

MANUFACTURER = "PacsLens"
SERIES_DESCRIPTION = "PacsLens AI result"
# High enough to sort after acquired series in PACS viewers, which order series by number.
SERIES_NUMBER = 9901
# Software Versions (0018,1020) of every SR: the release that made it (pacslens/__init__.py).
SOFTWARE_VERSION = __version__


# Besides private schemes (99...), a site may code the result in one of these standard schemes.
STANDARD_SCHEMES = ("DCM", "SCT", "LN", "RADLEX", "NCIt", "UMLS")


class SRBuildError(ValueError):
    """The SR cannot be built or failed validation: a permanent error for this result."""


@dataclass(frozen=True)
class SRCodes:
    """Site-configurable coded concepts; no standard code exists for an AI triage score.

    A private coding scheme designator must start with "99" (PS3.16 8.2) and is declared in
    the SR's Coding Scheme Identification Sequence.
    """

    scheme_designator: str = "99PACSLENS"
    scheme_name: str = "PacsLens local codes"
    scheme_organization: str = "PacsLens"
    scheme_version: str = ""
    score_code: str = "PL0001"
    score_meaning: str = "AI triage score"
    flag_code: str = "PL0002"
    flag_meaning: str = "AI triage finding"
    # A unitless UCUM annotation: the score is a model output in 0..1, not a probability.
    score_unit: CodedConcept = field(default_factory=lambda: CodedConcept("{score}", "UCUM", "score"))
    procedure_reported: CodedConcept = field(
        default_factory=lambda: CodedConcept.from_code(codes.LN.CTUnspecifiedBodyRegion)
    )

    def __post_init__(self) -> None:
        if not (self.scheme_designator.startswith("99") or self.scheme_designator in STANDARD_SCHEMES):
            raise ValueError(
                f"a private coding scheme designator must start with 99 (or use one of {', '.join(STANDARD_SCHEMES)})"
            )

    @property
    def score_concept(self) -> CodedConcept:
        return CodedConcept(self.score_code, self.scheme_designator, self.score_meaning, self.scheme_version or None)

    @property
    def flag_concept(self) -> CodedConcept:
        return CodedConcept(self.flag_code, self.scheme_designator, self.flag_meaning, self.scheme_version or None)


DEFAULT_CODES = SRCodes()


def build_sr(
    payload: ResultPayload,
    *,
    sr_codes: SRCodes = DEFAULT_CODES,
    software_version: str = SOFTWARE_VERSION,
    summary: Dataset | None = None,
) -> Dataset:
    """Build and validate the result SR. Raises SRBuildError (message without patient data).

    `summary`, the Secondary Capture sent with the SR (results/deliver/summary.py), is listed in
    the SR's Current Requested Procedure Evidence, so the SR references it.

    Returns the SR as read back from its validated Part 10 encoding, so what leaves is
    exactly what was checked, and its elements are still raw: C-STORE and STOW-RS pass them
    through (~0.3 ms) instead of pydicom encoding the content tree again (20 ms for 40
    slices, 120-250 ms for 300), which would dominate an SR C-STORE on an open association.
    """
    sources = load_source_instances(payload.source_instances)
    if not sources:
        raise SRBuildError(f"no source instances for study {payload.study_instance_uid}")
    foreign = {ds.StudyInstanceUID for ds in sources} - {payload.study_instance_uid}
    if foreign:
        raise SRBuildError(f"source instances belong to other studies than {payload.study_instance_uid}")
    try:
        report = _measurement_report(payload, sources, sr_codes)
        sr = hd.sr.Comprehensive3DSR(
            # The summary image sent beside the SR is listed in its evidence: the SR names it.
            evidence=sources + ([summary] if summary is not None else []),
            content=report,
            series_instance_uid=payload.sr_series_instance_uid,
            series_number=SERIES_NUMBER,
            sop_instance_uid=payload.sr_sop_instance_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            # COMPLETE: the document says all it will say; UNVERIFIED: no human signed it.
            is_complete=True,
            is_final=payload.is_final,
            is_verified=False,
            series_description=SERIES_DESCRIPTION,
            manufacturer_model_name=f"{payload.model_name} {payload.model_version}"[:64],
            software_versions=software_version,
            # Dates come from the result, not the clock, so a re-send is the same document.
            content_date=payload.created_at.date(),
            content_time=payload.created_at.time().replace(tzinfo=None),
            series_date=payload.created_at.date(),
            series_time=payload.created_at.time().replace(tzinfo=None),
            coding_schemes=[
                hd.coding_schemes.CodingSchemeIdentificationItem(
                    designator=sr_codes.scheme_designator,
                    name=sr_codes.scheme_name or None,
                    version=sr_codes.scheme_version or None,
                    responsible_organization=sr_codes.scheme_organization or None,
                )
            ],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        # Only the exception type: pydicom/highdicom messages may quote attribute values, and
        # `from None` keeps them out of tracebacks in the logs too.
        raise SRBuildError(f"cannot build SR for study {payload.study_instance_uid}: {type(exc).__name__}") from None
    encoded = sr_to_bytes(sr)
    validate_sr(encoded, payload=payload, sr_codes=sr_codes)
    return dcmread(io.BytesIO(encoded))


def sr_to_bytes(sr: Dataset) -> bytes:
    """Part 10 encoding (preamble, file meta, explicit VR little endian)."""
    buffer = io.BytesIO()
    dcmwrite(buffer, sr, enforce_file_format=True)
    return buffer.getvalue()


def load_source_instances(sources: Iterable[Dataset | Path]) -> list[Dataset]:
    # Only header attributes are needed for evidence and the image library; skipping pixel
    # data keeps a 300-slice CT study cheap to load.
    return [source if isinstance(source, Dataset) else dcmread(source, stop_before_pixels=True) for source in sources]


def _measurement_report(
    payload: ResultPayload, sources: Sequence[Dataset], sr_codes: SRCodes
) -> hd.sr.MeasurementReport:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        # One observer UID per installation and model version: a PACS can group results per
        # model, and tell two gateways running the same model apart.
        uid=payload.identity.device_uid(payload.model_name, payload.model_version),
        name=payload.model_name[:64],
        manufacturer_name=MANUFACTURER,
        model_name=f"{payload.model_name} {payload.model_version}"[:64],
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=device,
        )
    )
    algorithm = hd.sr.AlgorithmIdentification(name=payload.model_name, version=payload.model_version)
    evaluated = [hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID) for ds in sources]
    score = hd.sr.Measurement(
        name=sr_codes.score_concept,
        value=round(float(payload.triage_score), 6),
        unit=sr_codes.score_unit,
        algorithm_id=algorithm,
    )
    flag = hd.sr.QualitativeEvaluation(
        name=sr_codes.flag_concept,
        value=codes.SCT.Present if payload.finding_flag else codes.SCT.Absent,
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=payload.derived_uid("sr-tracking"),
            identifier="PacsLens triage",
        ),
        algorithm_id=algorithm,
        measurements=[score],
        qualitative_evaluations=[flag],
        source_images=evaluated,
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=sr_codes.procedure_reported,
        imaging_measurements=[group],
    )
    # The image library goes right before Imaging Measurements (the last item), as
    # highdicom would place it.
    root = report[0]
    root.ContentSequence.insert(len(root.ContentSequence) - 1, _image_library(sources))
    return report


def _image_library(sources: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library with one group per series and bare entries.

    highdicom's ImageLibrary adds the optional TID 1602 descriptors (position, orientation,
    spacing...) to every entry: ~4 kB per CT slice, a 1.3 MB SR for a 300-slice study that
    took seconds to build and hundreds of ms to store. Viewers read those from the images.
    """
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence()
    by_series: dict[str, list[Dataset]] = {}
    for ds in sources:
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    for series in by_series.values():
        group = hd.sr.ContainerContentItem(
            name=codes.DCM.ImageLibraryGroup,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        group.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.ImageContentItem(
                    name=CodedConcept("260753009", "SCT", "Source"),
                    referenced_sop_class_uid=ds.SOPClassUID,
                    referenced_sop_instance_uid=ds.SOPInstanceUID,
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
                for ds in series
            ]
        )
        library.ContentSequence.append(group)
    return library


# Attributes of the SR IOD modules (PS3.3 A.35.13) that must be present after encoding:
# Patient, General Study, SR Document Series, General Equipment, SR Document General,
# SR Document Content, SOP Common.
REQUIRED_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "ReferencedPerformedProcedureStepSequence",
    "Manufacturer",
    "InstanceNumber",
    "CompletionFlag",
    "VerificationFlag",
    "ContentDate",
    "ContentTime",
    "PerformedProcedureCodeSequence",
    "CurrentRequestedProcedureEvidenceSequence",
    "ValueType",
    "ConceptNameCodeSequence",
    "ContinuityOfContent",
    "ContentSequence",
    "SOPClassUID",
    "SOPInstanceUID",
    "CodingSchemeIdentificationSequence",
)


def validate_sr(encoded: bytes, *, payload: ResultPayload, sr_codes: SRCodes = DEFAULT_CODES) -> None:
    """Check the encoded SR the way a receiver will see it; raise SRBuildError if not sound.

    The Part 10 bytes are re-read with pydicom, checked for the IOD's required attributes
    and parsed back by highdicom, and the parsed content tree must carry the score and flag.
    """
    study = payload.study_instance_uid
    try:
        reread = dcmread(io.BytesIO(encoded))
    except Exception as exc:
        raise SRBuildError(f"SR for study {study} does not re-read: {type(exc).__name__}") from None
    missing = [keyword for keyword in REQUIRED_ATTRIBUTES if keyword not in reread]
    if missing:
        raise SRBuildError(f"SR for study {study} lacks {', '.join(missing)}")
    if reread.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        raise SRBuildError(f"SR for study {study} is not explicit VR little endian")
    expected = {
        "Modality": "SR",
        "SOPClassUID": Comprehensive3DSRStorage,
        "StudyInstanceUID": study,
        "SOPInstanceUID": payload.sr_sop_instance_uid,
        "SeriesInstanceUID": payload.sr_series_instance_uid,
    }
    wrong = [keyword for keyword, value in expected.items() if reread.get(keyword) != value]
    if wrong:
        raise SRBuildError(f"SR for study {study} has unexpected {', '.join(wrong)}")
    designators = {item.CodingSchemeDesignator for item in reread.CodingSchemeIdentificationSequence}
    if sr_codes.scheme_designator not in designators:
        raise SRBuildError(f"SR for study {study} does not declare {sr_codes.scheme_designator}")
    try:
        parsed = hd.sr.Comprehensive3DSR.from_dataset(reread)
        # highdicom types `content` as ContentSequence; from_dataset gives a TID 1500 MeasurementReport.
        groups = cast(hd.sr.MeasurementReport, parsed.content).get_image_measurement_groups()
    except Exception as exc:
        raise SRBuildError(f"highdicom cannot parse the SR for study {study}: {type(exc).__name__}") from None
    if len(groups) != 1:
        raise SRBuildError(f"SR for study {study} has {len(groups)} measurement groups, not 1")
    # highdicom 0.28 matches content item names without their Coding Scheme Version, so a
    # versioned concept would never match: look for the concept without it.
    score = CodedConcept(sr_codes.score_code, sr_codes.scheme_designator, sr_codes.score_meaning)
    flag = CodedConcept(sr_codes.flag_code, sr_codes.scheme_designator, sr_codes.flag_meaning)
    if not groups[0].get_measurements(name=score):
        raise SRBuildError(f"SR for study {study} lacks the triage score measurement")
    if not groups[0].get_qualitative_evaluations(name=flag):
        raise SRBuildError(f"SR for study {study} lacks the finding qualitative evaluation")
