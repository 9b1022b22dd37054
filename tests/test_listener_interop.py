"""dcmtk `storescu`/`echoscu` against the real listener subprocess, over real sockets.

What a modality or PACS would send arrives complete, recorded, and byte-identical in dataset
content, stored in the transfer syntax it was sent in.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.support.ct import ct_series_write
from tests.support.dicom_files import dataset_bytes, file_transfer_syntax
from tests.support.listener_proc import dcmtk_env
from tests.support.net import require_program

pytestmark = pytest.mark.interop

# (pydicom test file, transfer syntax it is encoded in, storescu option proposing that syntax)
COMPRESSED_FILES = [
    ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50", "-xy"),  # JPEG Baseline
    ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51", "-xx"),  # JPEG Extended (12 bit)
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", "-xt"),  # JPEG-LS lossless
    ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81", "-xu"),  # JPEG-LS near-lossless
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90", "-xv"),  # JPEG 2000 lossless
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91", "-xw"),  # JPEG 2000
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5", "-xr"),  # RLE lossless
    ("image_dfl.dcm", "1.2.840.10008.1.2.1.99", "-xd"),  # Deflated Explicit VR LE
    ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2", "-xb"),  # Explicit VR Big Endian
    ("MR_small_implicit.dcm", "1.2.840.10008.1.2", "-xi"),  # Implicit VR LE
]
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"


def storescu(listener, files: list[Path], *options: str, calling: str = "STORESCU") -> subprocess.CompletedProcess:
    return listener.storescu(files, "-v", *options, calling_ae_title=calling)


def renumbered_copy(source: Path, folder: Path) -> Path:
    """A copy with a fresh SOP Instance UID: several pydicom test files share one, and a repeated
    UID is (rightly) stored once. A file without Study/Series UIDs (the listener refuses those)
    gets them. Pixel data and everything else is left as encoded."""
    ds = dcmread(source)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not ds.get(keyword):
            setattr(ds, keyword, generate_uid())
    if 0xFFFCFFFC in ds:  # storescu drops Data Set Trailing Padding when it sends
        del ds[0xFFFCFFFC]
    edited = folder / f"edited-{source.name}"
    ds.save_as(edited, enforce_file_format=True)
    # dcmtk sends sequences and items with explicit lengths whatever the file says; write the file
    # the way storescu will put it on the wire, so the stored bytes can be compared exactly.
    target = folder / source.name
    dcmconv = require_program("dcmconv")
    subprocess.run([dcmconv, "+t=", "+e", str(edited), str(target)], check=True, timeout=60)
    return target


def assert_stored_identically(listener, sent: list[Path]) -> None:
    rows = {row["sop_instance_uid"]: row for row in listener.instances()}
    for path in sent:
        ds = dcmread(path, stop_before_pixels=True)
        row = rows.get(str(ds.SOPInstanceUID))
        assert row is not None, f"{path.name} was not recorded"
        stored = listener.instance_path(row)
        assert stored.is_file(), f"{path.name}: recorded file {row['path']} is missing"
        sent_ts = str(ds.file_meta.TransferSyntaxUID)
        assert row["transfer_syntax_uid"] == sent_ts, path.name
        assert file_transfer_syntax(stored) == sent_ts, path.name
        assert row["size"] == stored.stat().st_size
        assert dcmread(stored) == dcmread(path), f"{path.name}: dataset content differs"
        if sent_ts != "1.2.840.10008.1.2.1.99":  # storescu re-deflates: the stream may differ, not the content
            assert dataset_bytes(stored) == dataset_bytes(path), f"{path.name}: dataset bytes differ"


def test_ct_series_over_one_association_arrives_complete(listener, tmp_path):
    files = ct_series_write(tmp_path / "ct", 300)

    result = storescu(listener, files)

    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        result.stdout.count("Received Store Response (Success)")
        + result.stderr.count("Received Store Response (Success)")
        == 300
    )
    assert listener.instance_count() == 300
    assert len(listener.stored_files()) == 300
    assert len(listener.studies()) == 1
    assert_stored_identically(listener, files)
    association = listener.associations()[-1]
    assert association["calling_ae_title"] == "STORESCU"


def test_compressed_files_are_stored_as_received(listener, tmp_path):
    sent = []
    for name, syntax, option in COMPRESSED_FILES:
        copy = renumbered_copy(Path(get_testdata_file(name)), tmp_path)
        assert file_transfer_syntax(copy) == syntax
        result = storescu(listener, [copy], option, "-R")
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        sent.append(copy)

    assert listener.instance_count() == len(sent)
    assert_stored_identically(listener, sent)


def test_jpeg_lossless_is_stored_as_received(listener, tmp_path):
    # pydicom ships no JPEG lossless SV1 file without a download; dcmtk makes one.
    dcmcjpeg = require_program("dcmcjpeg")
    source = renumbered_copy(Path(get_testdata_file("CT_small.dcm")), tmp_path)
    target = tmp_path / "jpeg_lossless.dcm"
    subprocess.run([dcmcjpeg, "+e1", str(source), str(target)], check=True, timeout=60)
    assert file_transfer_syntax(target) == JPEG_LOSSLESS_SV1

    result = storescu(listener, [target], "-xs", "-R")

    assert result.returncode == 0, result.stdout + result.stderr
    assert_stored_identically(listener, [target])


def test_echoscu_works(listener):
    echoscu = require_program("echoscu")

    result = subprocess.run(
        [echoscu, "-v", "-aet", "ECHOSCU", "-aec", listener.ae_title, listener.host, str(listener.port)],
        env=dcmtk_env(),
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_unknown_calling_ae_is_rejected(listener, tmp_path):
    echoscu = require_program("echoscu")
    files = ct_series_write(tmp_path / "ct", 1, rows=16, columns=16)

    echo = subprocess.run(
        [echoscu, "-aet", "STRANGER", "-aec", listener.ae_title, listener.host, str(listener.port)],
        env=dcmtk_env(),
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
    )
    store = storescu(listener, files, calling="STRANGER")

    for result in (echo, store):
        assert result.returncode != 0
        assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    assert listener.instance_count() == 0
    assert listener.stored_files() == []


def test_fast_header_reader_agrees_with_pydicom():
    """The listener reads the header of common files without pydicom; where it does, it must
    read exactly what pydicom reads (and leave everything else to pydicom)."""
    import pydicom.data
    from pydicom.filereader import read_partial

    from routing.store import header as ingest

    folder = Path(pydicom.data.__file__).parent / "test_files"
    compared = 0
    for path in sorted(folder.rglob("*.dcm")):
        fast = ingest._read_header_fast(path)
        if fast is None:
            continue
        with open(path, "rb") as fp:
            ds = read_partial(fp, stop_when=ingest._past_header, specific_tags=ingest._HEADER_TAG_NUMBERS)
        slow = {k: "" if ds.get(k) is None else str(ds.get(k)).strip() for k in ingest.HEADER_TAGS}
        assert fast == slow, path.name
        compared += 1
    assert compared > 40
