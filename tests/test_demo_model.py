"""The demonstration model and the synthetic studies it is meant to separate."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pydicom
import pytest
from django.core.management import call_command

from pacslens.demo_study import demo_study_write
from results.inference.demo_model import INPUT_SHAPE, THRESHOLD, demo_manifest, demo_model_build, demo_model_write
from results.inference.manifest import manifest_normalize
from results.inference.volume import LoadedVolume, slice_indices, volume_preprocess


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    _, manifest = demo_model_write(directory=directory)
    return onnxruntime.InferenceSession(str(directory / manifest["file"]), providers=["CPUExecutionProvider"]), manifest


def score(session_and_manifest, paths):
    session, manifest = session_and_manifest
    slices = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: float(d.ImagePositionPatient[2]))
    picked = [slices[i] for i in slice_indices(count=len(slices), depth=INPUT_SHAPE[2], sampling="nearest")]
    volume = LoadedVolume(
        stored=np.stack([d.pixel_array for d in picked]),
        slopes=np.array([float(d.RescaleSlope) for d in picked], dtype=np.float32),
        intercepts=np.array([float(d.RescaleIntercept) for d in picked], dtype=np.float32),
        source_slices=len(slices),
    )
    tensor = volume_preprocess(volume=volume, manifest=manifest_normalize(manifest))
    score, fraction = session.run(None, {"volume": tensor})
    return float(score[0]), float(fraction[0])


@pytest.mark.parametrize("seed", range(8))
def test_it_scores_lesion_studies_above_and_clean_ones_below_the_threshold(session, tmp_path, seed):
    # Varied slice counts and matrix sizes: the separation must not depend on one geometry.
    slices = [12, 24, 48, 64, 100, 30, 17, 80][seed]
    size = [128, 256, 512, 128, 256, 128, 512, 256][seed]
    clean = demo_study_write(outdir=tmp_path / "clean", slices=slices, size=size, seed=seed)
    lesion = demo_study_write(outdir=tmp_path / "lesion", slices=slices, size=size, seed=seed, lesion=True)
    clean_score, clean_fraction = score(session, clean.paths)
    lesion_score, lesion_fraction = score(session, lesion.paths)
    assert clean_score < THRESHOLD < lesion_score
    assert clean_fraction < 0.0002 < 0.002 < lesion_fraction


def test_the_model_is_labelled_a_demonstration():
    model = demo_model_build()
    assert "NOT FOR CLINICAL USE" in model.doc_string
    manifest = demo_manifest(file="x.onnx", sha256="0" * 64)
    assert manifest["demonstration"] is True
    assert "NOT FOR CLINICAL USE" in manifest["intended_use"]
    manifest_normalize(manifest)  # the demo's own manifest passes validation


def test_the_build_is_deterministic(tmp_path):
    _, first = demo_model_write(directory=tmp_path / "a")
    _, second = demo_model_write(directory=tmp_path / "b")
    assert first["sha256"] == second["sha256"]


class TestDemoStudy:
    def test_files_carry_realistic_modules_and_fake_patients(self, tmp_path):
        study = demo_study_write(outdir=tmp_path, slices=5, size=64, seed=3)
        headers = [pydicom.dcmread(p) for p in study.paths]
        first = headers[0]
        assert str(first.PatientName).startswith("ZZDEMO^")
        assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert first.Modality == "CT" and first.BodyPartExamined == "HEAD"
        assert first.RescaleIntercept == -1024 and first.RescaleSlope == 1
        assert {h.StudyInstanceUID for h in headers} == {study.study_instance_uid}
        assert {h.SeriesInstanceUID for h in headers} == {study.series_instance_uid}
        assert len({h.SOPInstanceUID for h in headers}) == 5
        positions = [float(h.ImagePositionPatient[2]) for h in headers]
        assert positions == sorted(positions) and len(set(positions)) == 5
        assert [h.InstanceNumber for h in headers] == [1, 2, 3, 4, 5]
        for keyword in (
            "StudyDate",
            "AccessionNumber",
            "FrameOfReferenceUID",
            "Manufacturer",
            "PixelSpacing",
            "SliceThickness",
        ):
            assert keyword in first, keyword
        assert first.pixel_array.shape == (64, 64)

    def test_every_study_has_new_uids(self, tmp_path):
        a = demo_study_write(outdir=tmp_path / "a", slices=1, size=32, seed=1)
        b = demo_study_write(outdir=tmp_path / "b", slices=1, size=32, seed=1)
        assert a.study_instance_uid != b.study_instance_uid

    def test_mr_studies(self, tmp_path):
        study = demo_study_write(outdir=tmp_path, slices=2, size=32, modality="MR")
        ds = pydicom.dcmread(study.paths[0])
        assert ds.Modality == "MR" and ds.SOPClassUID == pydicom.uid.MRImageStorage
        assert "RescaleIntercept" not in ds

    @pytest.mark.parametrize("syntax", ["rle", "jpeg2000", "jpegls"])
    def test_compressed_syntaxes_decode_to_the_same_pixels(self, tmp_path, syntax):
        plain = demo_study_write(outdir=tmp_path / "plain", slices=1, size=64, seed=5, lesion=True)
        packed = demo_study_write(
            outdir=tmp_path / syntax, slices=1, size=64, seed=5, lesion=True, transfer_syntax=syntax
        )
        ds = pydicom.dcmread(packed.paths[0])
        assert (
            ds.file_meta.TransferSyntaxUID
            == {"rle": "1.2.840.10008.1.2.5", "jpeg2000": "1.2.840.10008.1.2.4.90", "jpegls": "1.2.840.10008.1.2.4.80"}[
                syntax
            ]
        )
        assert ds.pixel_array.shape == (64, 64)
        # Same seed, same phantom; the noise field is rolled at random, so compare the tissue means.
        assert abs(float(ds.pixel_array.mean()) - float(pydicom.dcmread(plain.paths[0]).pixel_array.mean())) < 5

    def test_the_command(self, tmp_path, capsys):
        call_command("make_demo_study", str(tmp_path / "out"), "--lesion", "--slices", "3", "--size", "64")
        out = capsys.readouterr().out
        assert "Wrote 3 CT slices with a hyperdense lesion" in out
        assert len(list((tmp_path / "out").glob("*.dcm"))) == 3
