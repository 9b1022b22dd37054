"""The element-structure check's fast loop is only an optimisation: it never changes a verdict.

`_Walk.plain_elements_skip` steps over plain top-level elements without the general step's
bookkeeping. Here every file is judged twice, with the loop and with it replaced by "look at
nothing" (the general step alone), over whole files and over each file cut at every byte of its
header, and with bytes of the header overwritten: the verdicts must be equal, and every cut
file must be refused.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from routing.store import structure
from routing.store.structure import dataset_structure_problem
from tests.support.ct import make_ct
from tests.support.dicom_files import dataset_bytes, part10_bytes

SEED = 20261129


def _with_sequences(ds: Dataset) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "113691", "DCM", "Image Acquisition"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ref.PurposeOfReferenceCodeSequence = Sequence([code])
    ds.ReferencedImageSequence = Sequence([ref, ref])
    ds.ProcedureCodeSequence = Sequence([code])
    return ds


def _encapsulated(ds: Dataset) -> Dataset:
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(98) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    return ds


def _implicit(ds: Dataset) -> Dataset:
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


CORPUS = {
    "ct explicit": lambda: make_ct(),
    "ct implicit": lambda: _implicit(make_ct()),
    "ct with sequences": lambda: _with_sequences(make_ct()),
    "ct with sequences, implicit": lambda: _implicit(_with_sequences(make_ct())),
    "encapsulated": lambda: _encapsulated(make_ct()),
}


def _verdicts(path: Path, monkeypatch) -> tuple[str | None, str | None]:
    fast = dataset_structure_problem(path)
    with monkeypatch.context() as patch:
        patch.setattr(structure._Walk, "plain_elements_skip", lambda self, pos, frame, size: pos)
        general = dataset_structure_problem(path)
    return fast, general


def _pixel_data_at(data: bytes) -> int:
    return data.rfind(b"\xe0\x7f\x10\x00")


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_whole_file_is_whole_either_way(name, tmp_path, monkeypatch):
    ds = CORPUS[name]()
    if ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian:
        assert ds.file_meta.TransferSyntaxUID.is_little_endian
    path = tmp_path / "whole.dcm"
    path.write_bytes(part10_bytes(ds))
    assert _verdicts(path, monkeypatch) == (None, None)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_cut_in_the_header_is_refused_either_way(name, tmp_path, monkeypatch):
    data = part10_bytes(CORPUS[name]())
    path = tmp_path / "cut.dcm"
    path.write_bytes(data)
    start = len(data) - len(dataset_bytes(path))
    # Every even byte (element boundaries are even) from the start of the data set to just past
    # the start of Pixel Data, and the odd ones near its header.
    pixel_data_at = _pixel_data_at(data)
    for end in [*range(start, pixel_data_at + 16, 2), *range(pixel_data_at + 1, pixel_data_at + 16, 2)]:
        path.write_bytes(data[:end])
        fast, general = _verdicts(path, monkeypatch)
        assert fast == general, f"cut at {end}"
        assert fast is not None, f"cut at {end} passed"


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_overwritten_header_bytes_get_the_same_verdict(name, tmp_path, monkeypatch):
    rng = random.Random(SEED)
    data = part10_bytes(CORPUS[name]())
    path = tmp_path / "mutated.dcm"
    header_end = _pixel_data_at(data) + 12
    refused = 0
    for _ in range(150):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            mutated[rng.randrange(132, header_end)] = rng.choice([0x00, 0xFF, 0x7F, 0xFE, rng.randrange(256)])
        path.write_bytes(bytes(mutated))
        fast, general = _verdicts(path, monkeypatch)
        assert fast == general
        refused += fast is not None
    assert refused > 15  # the mutations reach the structure, not only values
