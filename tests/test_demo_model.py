"""The demonstration model and the synthetic studies it is meant to separate.

Issue 15's bar: no flag on clean head CTs with noise up to 12 HU, calcifications, a
beam-hardening band, 0.625-5 mm slices, 0.4-1.0 mm pixels, unsigned or signed storage and
1-600 slices; a flag for any hyperdense region of 0.5 mL or more at 50-90 HU in the brain.
Studies go through the pipeline's own preprocessing (volume_prepare) from files.
"""

from __future__ import annotations

import tracemalloc

import onnxruntime
import pydicom
import pytest
from django.core.management import call_command

from pacslens.demo_study import LesionSpec, Realism, demo_study_write
from results.inference.demo_model import THRESHOLD, demo_manifest, demo_model_build, demo_model_write
from results.inference.manifest import manifest_normalize
from results.inference.volume import slices_from_files, volume_prepare, volume_slice_indices

HARD = Realism(noise_sd=12, calcifications=True, beam_hardening=30)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    _, manifest = demo_model_write(directory=directory)
    return onnxruntime.InferenceSession(str(directory / manifest["file"]), providers=["CPUExecutionProvider"]), manifest


def score(session_and_manifest, paths):
    """(score, hyperdense volume in mL) as the pipeline computes them from these files."""
    session, manifest = session_and_manifest
    manifest = manifest_normalize(manifest)
    slices = slices_from_files(paths)
    indices = volume_slice_indices(slices=slices, manifest=manifest)
    tensor = volume_prepare(slices=slices, indices=indices, manifest=manifest).tensor
    score, volume, _largest = session.run(None, {"volume": tensor})
    return float(score[0]), float(volume[0])


@pytest.mark.parametrize("seed", range(6))
def test_it_scores_lesion_studies_above_and_clean_ones_below_the_threshold(session, tmp_path, seed):
    # The tour's studies, varied slice counts and matrix sizes: separation must not depend on one geometry.
    slices = [12, 24, 48, 64, 100, 30][seed]
    size = [128, 256, 512, 128, 256, 128][seed]
    clean = demo_study_write(outdir=tmp_path / "clean", slices=slices, size=size, seed=seed)
    lesion = demo_study_write(outdir=tmp_path / "lesion", slices=slices, size=size, seed=seed, lesion=True)
    clean_score, clean_ml = score(session, clean.paths)
    lesion_score, lesion_ml = score(session, lesion.paths)
    assert clean_score < 0.05 and clean_ml == 0
    assert lesion_score > 0.95 and lesion_ml > 1


@pytest.mark.parametrize(
    "thickness, spacing, storage, syntax",
    [
        (0.625, 0.4, "unsigned", "explicit"),
        (1.25, 0.5, "signed", "explicit"),
        (2.5, 0.7, "unsigned", "rle"),
        (5.0, 1.0, "signed", "explicit"),
    ],
)
def test_clean_studies_with_noise_calcifications_and_beam_hardening_are_not_flagged(
    session, tmp_path, thickness, spacing, storage, syntax
):
    study = demo_study_write(
        outdir=tmp_path,
        slices=round(150 / thickness),
        slice_thickness=thickness,
        pixel_spacing=spacing,
        size=min(512, 2 * round(120 / spacing)),
        storage=storage,
        transfer_syntax=syntax,
        realism=HARD,
        seed=int(thickness * 8),
    )
    assert score(session, study.paths)[0] < THRESHOLD


@pytest.mark.parametrize(
    "ml, hu, position, thickness",
    [
        (0.5, 50, (20, -30, 10), 2.5),  # the smallest and faintest, noisy slices
        (0.5, 50, (20, -30, 10), 5.0),  # ... on thick slices: a 0.1 mL core, score 0.72
        (0.5, 60, (20, -30, 10), 5.0),  # thick noisy slices
        (0.5, 50, (0, 0, 30), 0.625),  # near the midline, above the ventricles
        (0.5, 90, (-35, 20, -20), 2.5),
        (0.6, 60, (0, -55, 0), 1.25),  # frontal, 1.5 cm from the inner table
        (4.0, 70, (40, 10, 5), 5.0),
    ],
)
def test_small_faint_lesions_anywhere_in_the_brain_are_flagged(session, tmp_path, ml, hu, position, thickness):
    study = demo_study_write(
        outdir=tmp_path,
        slices=round(150 / thickness),
        slice_thickness=thickness,
        pixel_spacing=0.5,
        size=480,
        realism=HARD,
        lesion=LesionSpec(ml=ml, hu=hu, position=position),
        seed=int(ml * 10 + hu),
    )
    assert score(session, study.paths)[0] > THRESHOLD


@pytest.mark.parametrize("slices", [1, 3])
def test_a_few_slices_are_scored_not_flagged(session, tmp_path, slices):
    study = demo_study_write(outdir=tmp_path, slices=slices, slice_thickness=5, size=256, realism=HARD, seed=slices)
    assert score(session, study.paths)[0] < THRESHOLD


def test_600_slices_are_read_one_at_a_time(session, tmp_path):
    """Memory stays at a few slices plus the model's input, not the whole series."""
    study = demo_study_write(
        outdir=tmp_path, slices=600, slice_thickness=0.625, pixel_spacing=0.9, size=256, realism=HARD, seed=600
    )
    series_bytes = 600 * 256 * 256 * 2
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = score(session, study.paths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result[0] < THRESHOLD
    assert peak < series_bytes / 2, f"peak {peak / 1e6:.0f} MB for a {series_bytes / 1e6:.0f} MB series"


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

    def test_the_command_options_reach_the_files(self, tmp_path, capsys):
        call_command(
            "make_demo_study",
            str(tmp_path / "out"),
            "--slice-thickness", "5",
            "--pixel-spacing", "0.8",
            "--size", "300",
            "--storage", "signed",
            "--noise", "12",
            "--calcifications",
            "--beam-hardening", "20",
            "--lesion-ml", "2",
            "--lesion-hu", "80",
            "--lesion-position", "0,0,10",
            "--seed", "4",
        )  # fmt: skip
        assert "Wrote 30 CT slices with a hyperdense lesion (2.0 mL)" in capsys.readouterr().out
        ds = pydicom.dcmread(sorted((tmp_path / "out").glob("*.dcm"))[15])
        assert float(ds.SliceThickness) == 5 and [float(v) for v in ds.PixelSpacing] == [0.8, 0.8]
        assert ds.PixelRepresentation == 1 and ds.RescaleIntercept == 0 and ds.BitsStored == 16
        assert ds.pixel_array.min() < -900  # air, stored as signed HU

    @pytest.mark.parametrize("bad", [["--lesion-position", "1,2"], ["--slice-thickness", "0"], ["--noise", "-1"]])
    def test_the_command_refuses_bad_options(self, tmp_path, bad):
        from django.core.management.base import CommandError

        with pytest.raises(CommandError):
            call_command("make_demo_study", str(tmp_path / "out"), *bad)

    def test_lesion_volume_and_density_are_what_was_asked(self, tmp_path):
        study = demo_study_write(
            outdir=None,
            slices=150,
            slice_thickness=1,
            pixel_spacing=0.5,
            size=400,
            realism=Realism(noise_sd=0),
            seed=3,
            lesion=LesionSpec(ml=1.0, hu=77, position=(10, 10, 0)),
        )
        voxels = sum(int((ds.pixel_array.astype(int) - 1024 == 77).sum()) for ds in study.datasets)
        assert abs(voxels * 0.5 * 0.5 * 1 / 1000 - 1.0) < 0.05
