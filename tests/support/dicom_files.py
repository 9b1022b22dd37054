"""DICOM Part 10 bytes for the tests: encode a dataset as a file, read a file's dataset bytes.

`part10_bytes(ds)` is what a test uploads or posts; `dataset_bytes(path)` is what a test
compares between a sent file and the stored copy (the dataset after the File Meta group,
which a receiver may rewrite).
"""

from __future__ import annotations

import io
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import dcmwrite

# VRs with a 4-byte length after two reserved bytes (PS3.5 7.1.2).
LONG_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"OV", b"UC", b"UR", b"SV", b"UV"}


def part10_bytes(ds: Dataset) -> bytes:
    """`ds` as a Part 10 file (preamble, File Meta Information, dataset)."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its File Meta Information (group 0002, always Explicit VR LE)."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        raise ValueError(f"{path} is not a DICOM Part 10 file")
    offset = 132
    while data[offset : offset + 2] == b"\x02\x00":
        vr = data[offset + 4 : offset + 6]
        if vr in LONG_VRS:
            length = int.from_bytes(data[offset + 8 : offset + 12], "little")
            offset += 12 + length
        else:
            length = int.from_bytes(data[offset + 6 : offset + 8], "little")
            offset += 8 + length
    return data[offset:]


def file_transfer_syntax(path: Path) -> str:
    return str(read_file_meta_info(path).TransferSyntaxUID)
