"""Synthetic CT for the tests and benchmarks: thin wrappers over pacslens/demo_study.py.

There is one CT writer, `demo_study_write`; these helpers only pick its options for what a
test needs. `make_ct` is one tiny instance in memory (a listener or ingest test sends many);
`make_ct_slices` a small study in memory for a named patient (SR, C-STORE, STOW, Orthanc
tests); `ct_series_write` files on disk with noise pixels, fast at any size (dcmtk interop
tests, benchmarks). No real patient: names and IDs say so.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset

from pacslens.demo_study import demo_study_write


def make_ct(study_uid: str | None = None, series_uid: str | None = None, sop_uid: str | None = None) -> Dataset:
    """One 4x4 CT instance of a new study (or of `study_uid`/`series_uid`), with file meta."""
    attributes = {"PatientName": "ZZTEST^LISTENER", "PatientID": "ZZ0001", "AccessionNumber": "ACC1"}
    if study_uid:
        attributes["StudyInstanceUID"] = study_uid
    if series_uid:
        attributes["SeriesInstanceUID"] = series_uid
    (ds,) = demo_study_write(outdir=None, slices=1, size=4, attributes=attributes).datasets
    if sop_uid:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    return ds


def make_ct_slices(
    count: int = 3,
    *,
    patient_name: str = "Test^Patient",
    patient_id: str = "PL-TEST-1",
    accession_number: str = "ACC0001",
) -> list[Dataset]:
    """`count` 16x16 CT slices of one new study/series, as pydicom datasets with file meta."""
    attributes = {"PatientName": patient_name, "PatientID": patient_id, "AccessionNumber": accession_number}
    return demo_study_write(outdir=None, slices=count, size=16, attributes=attributes).datasets


def ct_series_write(
    folder: Path,
    count: int = 300,
    *,
    rows: int = 512,
    columns: int = 512,
    study_instance_uid: str | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write a synthetic CT series (noise pixels, Explicit VR Little Endian), one file per slice."""
    attributes = {"StudyInstanceUID": study_instance_uid} if study_instance_uid else None
    study = demo_study_write(
        outdir=folder, slices=count, rows=rows, columns=columns, pixels="noise", seed=seed, attributes=attributes
    )
    return study.paths
