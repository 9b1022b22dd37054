"""The result SR: TID 1500 content, determinism, validation. Storage into Orthanc is covered by
test_dicom_send (C-STORE) and test_stow_client (STOW-RS)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.sr.codedict import codes

from results.deliver.payload import ResultPayload
from results.deliver.sr import DEFAULT_CODES, SRBuildError, SRCodes, build_sr, sr_to_bytes
from tests.support.ct import make_ct_slices
from tests.support.dicom_files import part10_bytes
from tests.support.identities import identity
from tests.support.sr import make_payload

PATIENT_NAME = "Doe^Jane"


def text_items(item) -> set[tuple[str, str]]:
    """(concept code, text) of every TEXT item below `item`, at any depth."""
    found = set()
    for child in item.get("ContentSequence", []):
        if child.ValueType == "TEXT":
            found.add((child.ConceptNameCodeSequence[0].CodeValue, child.TextValue))
        found |= text_items(child)
    return found


def image_references(item) -> set[str]:
    """SOP Instance UIDs of every IMAGE item below `item`, at any depth."""
    found = set()
    for child in item.get("ContentSequence", []):
        if child.ValueType == "IMAGE":
            found.add(child.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        found |= image_references(child)
    return found


def test_it_round_trips_through_highdicom():
    sources = make_ct_slices(3, patient_name=PATIENT_NAME)
    payload = make_payload(sources)

    parsed = hd.sr.srread(io.BytesIO(sr_to_bytes(build_sr(payload))))

    assert isinstance(parsed, hd.sr.Comprehensive3DSR)
    assert parsed.StudyInstanceUID == payload.study_instance_uid
    assert parsed.SOPInstanceUID == payload.sr_sop_instance_uid
    assert parsed.SeriesInstanceUID == payload.sr_series_instance_uid
    assert parsed.SeriesDescription == "PacsLens AI result"
    assert parsed.Manufacturer == "PacsLens"
    assert parsed.SoftwareVersions
    assert parsed.PreliminaryFlag == "PRELIMINARY"
    assert parsed.CompletionFlag == "COMPLETE"
    assert parsed.VerificationFlag == "UNVERIFIED"


def test_it_copies_patient_and_study_modules():
    sources = make_ct_slices(2, patient_name=PATIENT_NAME, patient_id="PID-9", accession_number="ACC-9")
    sr = build_sr(make_payload(sources))

    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
    ):
        assert sr[keyword].value == sources[0][keyword].value, keyword


def test_it_carries_score_flag_observer_and_algorithm():
    sources = make_ct_slices(3)
    payload = make_payload(sources, triage_score=0.25, finding_flag=False)
    parsed = hd.sr.Comprehensive3DSR.from_dataset(dcmread(io.BytesIO(sr_to_bytes(build_sr(payload)))))

    (group,) = parsed.content.get_image_measurement_groups()
    (score,) = group.get_measurements(name=DEFAULT_CODES.score_concept)
    assert score.value == pytest.approx(0.25)
    assert score.unit == DEFAULT_CODES.score_unit
    # TID 4019 algorithm identification under the score measurement.
    assert text_items(score[0]) >= {("111001", "demo-ich"), ("111003", "1.2.0")}
    (flag,) = group.get_qualitative_evaluations(name=DEFAULT_CODES.flag_concept)
    assert flag.value == codes.SCT.Absent
    assert group.tracking_uid == payload.derived_uid("sr-tracking")

    (observer,) = parsed.content.get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = observer.observer_identifying_attributes
    assert attributes.name == "demo-ich"
    assert attributes.model_name == "demo-ich 1.2.0"
    assert attributes.manufacturer_name == "PacsLens"


def test_it_marks_a_present_finding():
    sources = make_ct_slices(1)
    parsed = hd.sr.srread(io.BytesIO(sr_to_bytes(build_sr(make_payload(sources)))))
    (group,) = parsed.content.get_image_measurement_groups()
    (flag,) = group.get_qualitative_evaluations(name=DEFAULT_CODES.flag_concept)
    assert flag.value == codes.SCT.Present


def test_it_references_every_source_image():
    sources = make_ct_slices(4)
    sr = build_sr(make_payload(sources))
    source_uids = {str(ds.SOPInstanceUID) for ds in sources}

    (study_item,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert study_item.StudyInstanceUID == sources[0].StudyInstanceUID
    evidence = {
        item.ReferencedSOPInstanceUID
        for series in study_item.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == source_uids

    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    (group,) = parsed.content.get_image_measurement_groups()
    assert {image.referenced_sop_instance_uid for image in group.source_images} == source_uids
    (library,) = [item for item in parsed.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028"]
    assert image_references(library) == source_uids


def test_it_declares_the_private_coding_scheme():
    sr = build_sr(make_payload(make_ct_slices(1)))
    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == "99PACSLENS"


def test_it_uses_site_codes():
    site_codes = SRCodes(scheme_designator="99STMARY", score_code="S1", score_meaning="Haemorrhage triage score")
    sr = build_sr(make_payload(make_ct_slices(1)), sr_codes=site_codes)
    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    (group,) = parsed.content.get_image_measurement_groups()
    assert group.get_measurements(name=site_codes.score_concept)
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99STMARY"


def test_it_refuses_a_public_looking_private_scheme():
    with pytest.raises(ValueError):
        SRCodes(scheme_designator="PACSLENS")


def test_it_is_deterministic_per_result_seed():
    sources = make_ct_slices(2)
    first = build_sr(make_payload(sources))
    again = build_sr(make_payload(sources))
    other = build_sr(make_payload(sources, identity=identity("result-2")))

    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert first.ContentDate == again.ContentDate and first.ContentTime == again.ContentTime
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SeriesInstanceUID != first.SeriesInstanceUID


def test_it_reads_source_instances_from_files(tmp_path):
    sources = make_ct_slices(2)
    paths = []
    for index, ds in enumerate(sources):
        path = tmp_path / f"{index}.dcm"
        path.write_bytes(part10_bytes(ds))
        paths.append(path)
    sr = build_sr(make_payload(sources, source_instances=tuple(paths)))
    assert len(sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence) == 2


def test_it_refuses_sources_from_another_study_without_patient_data():
    sources = make_ct_slices(1, patient_name=PATIENT_NAME)
    stranger = make_ct_slices(1, patient_name=PATIENT_NAME)
    payload = make_payload(sources, source_instances=(sources[0], stranger[0]))
    with pytest.raises(SRBuildError) as excinfo:
        build_sr(payload)
    assert "Doe" not in str(excinfo.value)


def test_it_refuses_no_sources():
    payload = make_payload(make_ct_slices(1), source_instances=())
    with pytest.raises(SRBuildError):
        build_sr(payload)


def test_payload_keeps_patient_data_out_of_repr():
    payload = make_payload(make_ct_slices(1, patient_name=PATIENT_NAME, patient_id="PID-SECRET"))
    text = repr(payload)
    assert "Doe" not in text and "PID-SECRET" not in text


def test_payload_rejects_out_of_range_scores():
    with pytest.raises(ValueError):
        make_payload(make_ct_slices(1), triage_score=1.5)
    with pytest.raises(ValueError):
        make_payload(make_ct_slices(1), created_at=dt.datetime(2024, 1, 1))
    assert dataclasses.is_dataclass(ResultPayload)
