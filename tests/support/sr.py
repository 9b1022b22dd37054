"""Result payloads for the SR tests (build, C-STORE, STOW-RS, TLS), and the check that Orthanc
holds the SR where it belongs: in the source study, citing the source images, with the score.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest

from results.deliver.payload import Priority, ResultPayload
from tests.support.identities import identity


def make_payload(sources, **overrides) -> ResultPayload:
    values = dict(
        study_instance_uid=str(sources[0].StudyInstanceUID),
        accession_number=str(sources[0].AccessionNumber),
        patient_id=str(sources[0].PatientID),
        patient_name=str(sources[0].PatientName),
        triage_score=0.87,
        finding_flag=True,
        model_name="demo-ich",
        model_version="1.2.0",
        identity=identity("result-1"),
        created_at=dt.datetime(2024, 1, 1, 12, 5, 30, tzinfo=dt.UTC),
        priority=Priority.STAT,
        source_instances=tuple(sources),
    )
    values.update(overrides)
    return ResultPayload(**values)


def assert_orthanc_holds_the_sr(orthanc, sources, payload) -> None:
    (study,) = orthanc.find_instances({"StudyInstanceUID": payload.study_instance_uid}, "Study")
    (instance,) = orthanc.find_instances({"SOPInstanceUID": str(payload.sr_sop_instance_uid)})
    parent_study = orthanc.rest_get(f"/instances/{instance['ID']}/study")
    assert parent_study["ID"] == study["ID"], "the SR sits in the source study"
    tags = orthanc.instance_tags(instance["ID"])
    assert tags["SeriesDescription"] == "PacsLens AI result"
    referenced = {
        item["ReferencedSOPInstanceUID"]
        for study_item in tags["CurrentRequestedProcedureEvidenceSequence"]
        for series in study_item["ReferencedSeriesSequence"]
        for item in series["ReferencedSOPSequence"]
    }
    assert referenced == {str(ds.SOPInstanceUID) for ds in sources}
    content = list(walk_content(tags["ContentSequence"]))
    scores = [
        float(item["MeasuredValueSequence"][0]["NumericValue"])
        for item in content
        if item.get("ValueType") == "NUM" and item["ConceptNameCodeSequence"][0]["CodeValue"] == "PL0001"
    ]
    assert scores == [pytest.approx(payload.triage_score)]
    flags = [
        item["ConceptCodeSequence"][0]["CodeValue"]
        for item in content
        if item.get("ValueType") == "CODE" and item["ConceptNameCodeSequence"][0]["CodeValue"] == "PL0002"
    ]
    assert flags == ["52101004" if payload.finding_flag else "272519000"]


def walk_content(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in items:
        yield item
        yield from walk_content(item.get("ContentSequence", []))
