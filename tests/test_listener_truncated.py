"""Instances cut short are refused (0xC000) over real sockets, not acknowledged and stored."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, _config

from routing.models import Instance
from routing.store.spool import incoming_dir
from tests.test_listener import CALLING, encode, listener, make_ct  # noqa: F401 - the fixture

CANNOT_UNDERSTAND = 0xC000


@pytest.fixture(autouse=True)
def send_files_raw(monkeypatch):
    # Stream our crafted files as they are: the request UIDs come from the file meta.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def store(listener, path: Path, syntax: str = ExplicitVRLittleEndian) -> int:
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACSLENS")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def part10(tmp_path: Path, body: bytes, uid: str, syntax: str = ExplicitVRLittleEndian) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = syntax
    path = tmp_path / f"{uid}-{len(body)}.dcm"
    with path.open("wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, meta)
        fh.write(body)
    return path


def refused(listener, path: Path, uid: str, syntax: str = ExplicitVRLittleEndian) -> bool:
    status = store(listener, path, syntax)
    return (
        status == CANNOT_UNDERSTAND
        and not Instance.objects.filter(sop_instance_uid=uid).exists()
        and not any(incoming_dir().iterdir())
    )


class TestTruncatedInstances:
    def test_pixel_data_cut_short_is_refused(self, listener, tmp_path):
        ds = make_ct()
        body = encode(ds)[:-10]  # the peer stopped 10 bytes before the end of Pixel Data
        assert refused(listener, part10(tmp_path, body, ds.SOPInstanceUID), ds.SOPInstanceUID)

    def test_pixel_data_shorter_than_the_image_is_refused(self, listener, tmp_path):
        ds = make_ct()
        ds.PixelData = b"\x00\x01" * 8  # lengths add up, but 4 x 4 x 16 bits need 32 bytes
        assert refused(listener, part10(tmp_path, encode(ds), ds.SOPInstanceUID), ds.SOPInstanceUID)

    def test_encapsulated_pixel_data_without_its_delimiter_is_refused(self, listener, tmp_path):
        ds = make_ct()
        ds.PixelData = encapsulate([b"\xff\xd8" + b"\x00" * 30 + b"\xff\xd9"])
        ds["PixelData"].is_undefined_length = True
        body = encode(ds)
        assert body.endswith(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
        uid = ds.SOPInstanceUID
        assert refused(listener, part10(tmp_path, body[:-8], uid, JPEGBaseline8Bit), uid, JPEGBaseline8Bit)
        assert store(listener, part10(tmp_path, body, uid, JPEGBaseline8Bit), JPEGBaseline8Bit) == 0x0000

    def test_whole_instance_is_stored(self, listener, tmp_path):
        ds = make_ct()
        assert store(listener, part10(tmp_path, encode(ds), ds.SOPInstanceUID)) == 0x0000
        assert Instance.objects.filter(sop_instance_uid=ds.SOPInstanceUID).exists()
