"""Fresh UIDs for files already on disk, so a benchmark round is never a duplicate of an earlier one.

A listener that has stored an instance before answers a duplicate without doing the work again,
so a round re-sending the same files would measure the short cut. `uids_refresh` gives the files
a new Study, Series and Frame of Reference UID (the same for all of them) and a new SOP Instance
UID each (in the data set and its file meta), and rewrites them in place: seconds for a 300-slice
series, to be done outside the timed part.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid


def uids_refresh(paths: Sequence[Path]) -> str:
    """Rewrite `paths` (one series) with new UIDs; return the new Study Instance UID."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        if "FrameOfReferenceUID" in ds:
            ds.FrameOfReferenceUID = frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(path)
    return study
