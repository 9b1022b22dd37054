"""The listener over real sockets, with pynetdicom as the sending modality."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from routing.models import ApplicationEntity, Instance, StoreAssociation, Study, StudyState
from routing.receive.listener import DicomListener

CALLING = "MODALITY1"


def make_ct(study_uid: str | None = None, series_uid: str | None = None, sop_uid: str | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "ZZTEST^LISTENER"
    ds.PatientID = "ZZ0001"
    ds.AccessionNumber = "ACC1"
    ds.Modality = "CT"
    ds.BodyPartExamined = "HEAD"
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x00\x01" * 16
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_part10(path: Path, meta_class: str, meta_instance: str, body: bytes) -> Path:
    """A Part 10 file whose meta (what pynetdicom puts in the request) says one thing and the body another."""
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = meta_class
    meta.MediaStorageSOPInstanceUID = meta_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with path.open("wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, meta)
        fh.write(body)
    return path


def encode(ds: Dataset) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


@pytest.fixture
def listener(transactional_db, data_dir):
    ApplicationEntity.objects.create(ae_title=CALLING, host="127.0.0.1", may_send=True)
    dicom = DicomListener(host="127.0.0.1", port=0, ae_title="PACSLENS")
    dicom.start()
    yield dicom
    dicom.stop(grace=2)


def associate(listener: DicomListener, calling: str = CALLING, called: str = "PACSLENS"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", listener.port, ae_title=called)


class TestEchoAndStore:
    def test_echo_works(self, listener):
        assoc = associate(listener)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()

    def test_store_is_durable_and_recorded(self, listener, data_dir):
        ds = make_ct()
        assoc = associate(listener)
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        instance = Instance.objects.get(sop_instance_uid=ds.SOPInstanceUID)
        stored = dcmread(data_dir / instance.path)
        assert stored.SOPInstanceUID == ds.SOPInstanceUID
        assert stored.PixelData == ds.PixelData
        assert instance.calling_ae_title == CALLING
        assert instance.transfer_syntax_uid == ExplicitVRLittleEndian
        study = instance.study
        assert study.state == StudyState.RECEIVING
        assert study.modalities == "CT"
        assert study.sender.ae_title == CALLING
        assert list(study.events.values_list("kind", flat=True)) == ["receiving"]
        assert not list((data_dir / "incoming").iterdir())

    def test_association_row_records_release(self, listener):
        assoc = associate(listener)
        assoc.send_c_store(make_ct())
        assoc.send_c_store(make_ct())
        assoc.release()
        row = StoreAssociation.objects.get()
        for _ in range(50):  # the release handler runs on the listener's thread
            row.refresh_from_db()
            if row.ended_at:
                break
            import time

            time.sleep(0.05)
        assert row.released_normally
        assert row.instances_received == 2

    def test_duplicate_is_stored_once(self, listener, data_dir):
        ds = make_ct()
        assoc = associate(listener)
        assert assoc.send_c_store(ds).Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        assert Instance.objects.filter(sop_instance_uid=ds.SOPInstanceUID).count() == 1
        assert len(list((data_dir / "instances").rglob("*.dcm"))) == 1

    def test_duplicate_with_other_content_keeps_first_and_says_so(self, listener):
        ds = make_ct()
        assoc = associate(listener)
        assoc.send_c_store(ds)
        ds.PixelData = b"\x07\x00" * 16
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        study = Study.objects.get(study_instance_uid=ds.StudyInstanceUID)
        assert study.events.filter(kind="duplicate_conflict").exists()


class TestAssociationPolicy:
    def test_unknown_calling_ae_is_rejected(self, listener):
        assoc = associate(listener, calling="STRANGER")
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 3)
        assert not Study.objects.exists()

    def test_disabled_ae_is_rejected(self, listener):
        ApplicationEntity.objects.filter(ae_title=CALLING).update(enabled=False)
        listener.refresh_allow_list()
        assert associate(listener).is_rejected

    def test_wrong_called_ae_is_rejected(self, listener):
        assoc = associate(listener, called="SOMEONEELSE")
        assert assoc.is_rejected
        assert assoc.acceptor.primitive.diagnostic == 7

    def test_accept_any_calling_ae_switch(self, listener, settings):
        settings.DICOM_ACCEPT_ANY_CALLING_AE = True
        assoc = associate(listener, calling="STRANGER")
        assert assoc.is_established
        assert assoc.send_c_store(make_ct()).Status == 0x0000
        assoc.release()

    def test_peer_ip_check(self, listener):
        ApplicationEntity.objects.filter(ae_title=CALLING).update(check_peer_ip=True, host="192.0.2.10")
        listener.refresh_allow_list()
        assert associate(listener).is_rejected


class TestBadInput:
    @pytest.fixture(autouse=True)
    def send_files_raw(self, monkeypatch):
        # Stream our crafted files as they are: the request UIDs come from the file meta.
        from pynetdicom import _config

        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    def test_unparseable_dataset_gets_cannot_understand_and_listener_keeps_serving(self, listener, tmp_path):
        uid = generate_uid()
        # An explicit-VR element with a value representation that does not exist.
        body = b"\x08\x00\x16\x00ZZ\x04\x001.2\x00"
        path = write_part10(tmp_path / "bad.dcm", CTImageStorage, uid, body)
        assoc = associate(listener)
        status = assoc.send_c_store(path).Status
        assert 0xC000 <= status <= 0xCFFF
        assert assoc.send_c_store(make_ct()).Status == 0x0000
        assoc.release()
        assert not Instance.objects.filter(sop_instance_uid=uid).exists()

    def test_instance_uid_mismatch_gets_a900(self, listener, tmp_path):
        ds = make_ct()
        path = write_part10(tmp_path / "mismatch.dcm", CTImageStorage, generate_uid(), encode(ds))
        assoc = associate(listener)
        assert assoc.send_c_store(path).Status == 0xA900
        assoc.release()
        assert not Instance.objects.exists()

    def test_uid_path_traversal_stays_inside_the_data_dir(self, listener, tmp_path, data_dir):
        evil = "../../../../tmp/pacslens-escape"
        ds = make_ct(sop_uid=evil)
        path = write_part10(tmp_path / "evil.dcm", CTImageStorage, evil, encode(ds))
        assoc = associate(listener)
        assert assoc.send_c_store(path).Status == 0xA900
        assoc.release()
        assert not Path("/tmp/pacslens-escape").exists()
        outside = [p for p in tmp_path.rglob("*") if p.is_file() and data_dir not in p.parents and p != path]
        assert outside == []
        assert not Instance.objects.exists()

    def test_disk_floor_refuses_store_then_association(self, listener, settings, data_dir):
        assoc = associate(listener)
        settings.DISK_FREE_FLOOR_MB = 10**9  # a petabyte: certainly below the floor
        assert assoc.send_c_store(make_ct()).Status == 0xA700
        assoc.release()
        refused = associate(listener)
        assert refused.is_rejected
        assert refused.acceptor.primitive.result == 2  # transient: try again later
        settings.DISK_FREE_FLOOR_MB = 0
        again = associate(listener)
        assert again.send_c_store(make_ct()).Status == 0x0000
        again.release()
        assert Instance.objects.count() == 1
