"""Loading and preprocessing: the fast header reader against pydicom, resampling, rescale, window."""

from __future__ import annotations

import numpy as np
import pydicom

from pacslens.demo_study import demo_study_write


def demo(tmp_path, name="s", **kwargs):
    return demo_study_write(outdir=tmp_path / name, **kwargs)


class TestHeaderReader:
    """The fast header reader must agree with pydicom, and give way to it on anything unusual."""

    def fields(self, header):
        return (
            header.rows,
            header.columns,
            header.bits_allocated,
            header.pixel_representation,
            header.rescale_slope,
            header.rescale_intercept,
            header.instance_number,
            header.position,
            header.orientation,
            header.pixel_spacing,
            header.slice_thickness,
        )

    def test_it_agrees_with_pydicom_and_locates_the_pixels(self, tmp_path):
        from routing.store.header import slice_header_read_fast as header_read_fast
        from routing.store.header import slice_header_read_pydicom as header_read_pydicom

        study = demo(tmp_path, slices=3, size=64, seed=70)
        for path in study.paths:
            fast = header_read_fast(path)
            assert fast is not None and fast.pixel_offset is not None
            assert self.fields(fast) == self.fields(header_read_pydicom(path))
            pixels = np.fromfile(path, dtype="<u2", count=64 * 64, offset=fast.pixel_offset).reshape(64, 64)
            assert (pixels == pydicom.dcmread(path).pixel_array).all()

    def test_implicit_vr_and_undefined_length_sequences(self, tmp_path):
        from pydicom.dataset import Dataset

        from routing.store.header import slice_header_read_fast as header_read_fast
        from routing.store.header import slice_header_read_pydicom as header_read_pydicom

        path = demo(tmp_path, slices=1, size=64, seed=71).paths[0]
        ds = pydicom.dcmread(path)
        inner = Dataset()
        inner.ReferencedSOPClassUID = ds.SOPClassUID
        inner.ReferencedSOPInstanceUID = pydicom.uid.generate_uid()
        nested = Dataset()
        nested.CodeValue = "X"
        inner.PurposeOfReferenceCodeSequence = [nested]
        ds.ReferencedImageSequence = [inner]
        ds["ReferencedImageSequence"].is_undefined_length = True
        ds.ReferencedImageSequence[0].is_undefined_length_sequence_item = True
        ds.RescaleIntercept = -1000  # after the sequence: proves the reader skipped it correctly
        for syntax in (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian):
            ds.file_meta.TransferSyntaxUID = syntax
            out = tmp_path / f"{syntax}.dcm"
            ds.save_as(out, enforce_file_format=True)
            fast = header_read_fast(out)
            assert fast is not None, syntax
            assert fast.rescale_intercept == -1000
            assert self.fields(fast) == self.fields(header_read_pydicom(out))

    def test_compressed_files_fall_back_to_pydicom(self, tmp_path):
        from routing.store.header import slice_header_read as header_read
        from routing.store.header import slice_header_read_fast as header_read_fast

        path = demo(tmp_path, slices=1, size=64, seed=72, transfer_syntax="rle").paths[0]
        assert header_read_fast(path) is None
        assert header_read(path).rows == 64


class TestPreprocessing:
    def manifest(self, **input_changes):
        from results.inference.demo_model import demo_manifest
        from results.inference.manifest import manifest_normalize

        manifest = demo_manifest(file="x.onnx", sha256="0" * 64)
        manifest["input"].update(input_changes)
        manifest["input"]["shape"] = [1, 1, 2, 2, 2]
        return manifest_normalize(manifest)

    def volume(self):
        from results.inference.volume import LoadedVolume

        stored = np.arange(4 * 4 * 4, dtype=np.uint16).reshape(4, 4, 4) * 10
        return LoadedVolume(
            stored=stored, slopes=np.full(4, 2, np.float32), intercepts=np.full(4, -100, np.float32), source_slices=4
        )

    def test_nearest_and_rescale(self):
        from results.inference.volume import volume_preprocess

        volume = self.volume()
        volume.stored = volume.stored[[0, 2]]
        volume.slopes, volume.intercepts = volume.slopes[:2], volume.intercepts[:2]
        tensor = volume_preprocess(volume=volume, manifest=self.manifest(resize="nearest"))
        assert tensor.shape == (1, 1, 2, 2, 2) and tensor.dtype == np.float32
        expected = volume.stored[:, 1::2, 1::2].astype(np.float32) * 2 - 100
        assert np.array_equal(tensor[0, 0], expected)

    def test_linear_resize_mean_slabs_and_window(self):
        from results.inference.volume import volume_preprocess

        tensor = volume_preprocess(
            volume=self.volume(),
            manifest=self.manifest(resize="linear", slices="mean", window={"center": 500, "width": 1000}),
        )
        hu = self.volume().stored.astype(np.float32) * 2 - 100
        # Linear 4→2 with aligned centres averages pixel pairs; mean slabs average slice pairs.
        pooled = hu.reshape(2, 2, 2, 2, 2, 2).mean(axis=(1, 3, 5))
        assert np.allclose(tensor[0, 0], np.clip(pooled, 0, 1000) / 1000, atol=1e-6)


class TestPhysicalGrid:
    """Manifests with `input.spacing`: the series resampled to millimetres, one slice at a time."""

    def manifest(self):
        from results.inference.demo_model import demo_manifest
        from results.inference.manifest import manifest_normalize

        return manifest_normalize(demo_manifest(file="x.onnx", sha256="0" * 64))

    def tensor(self, paths):
        from results.inference.volume import slices_from_files, volume_prepare, volume_slice_indices

        manifest = self.manifest()
        slices = slices_from_files(paths)
        indices = volume_slice_indices(slices=slices, manifest=manifest)
        return volume_prepare(slices=slices, indices=indices, manifest=manifest).tensor

    def test_storage_conventions_and_geometries_give_the_same_hounsfield_grid(self, tmp_path):
        from pacslens.demo_study import Realism

        quiet = Realism(noise_sd=0)
        common = {"slices": 60, "slice_thickness": 2.5, "realism": quiet, "seed": 5}
        unsigned = demo(tmp_path, "u", size=256, pixel_spacing=1.0, **common)
        signed = demo(tmp_path, "s", size=256, pixel_spacing=1.0, storage="signed", **common)
        fine = demo(tmp_path, "f", size=512, pixel_spacing=0.5, **common)
        a, b, c = (self.tensor(s.paths) for s in (unsigned, signed, fine))
        assert a.shape == (1, 1, 90, 128, 128) and a.dtype == np.float32
        assert np.array_equal(a, b)
        # 0.5 mm pixels averaged 4 x 4 or 1.0 mm pixels 2 x 2: the same 2 mm voxels, edges aside.
        assert np.median(np.abs(a - c)) < 0.5
        assert abs(float(a[0, 0, 45, 64, 64]) - 28) < 1  # white matter at the centre
        assert a[0, 0, 45, 0, 0] == -1000 and a[0, 0, 0, 64, 64] == -1024  # air; beyond the series: the fill

    def test_slab_weights(self):
        from results.inference.volume import _z_weights

        class H:
            position = [0.0, 0.0, 0.0]
            slice_thickness = 5.0

        class S:
            def __init__(self, z):
                self.position, self.header = z, H()

        weights = _z_weights(slices=[S(0.0), S(5.0), S(10.0)], depth=9, spacing=2.0)
        # Slabs centred on 5 mm, 2 mm apart: -3 .. 13 mm.
        sums = weights.sum(axis=1)
        assert np.allclose(sums[1:8], 1) and sums[0] == 0 and sums[8] == 0  # -3 and 13: over half a slice out
        assert np.allclose(weights[4], [0, 1, 0])  # the slab at 5 mm holds the middle slice
        assert np.allclose(weights[3], [0.4, 0.6, 0])  # 3 mm: interpolated
        thin = _z_weights(slices=[S(z * 0.5) for z in range(20)], depth=5, spacing=2.0)
        assert np.allclose(thin.sum(axis=1), 1) and (thin > 0).sum(axis=1).max() == 4  # 4 thin slices averaged
        single = _z_weights(slices=[S(0.0)], depth=5, spacing=2.0)
        assert single.sum() == 3  # the slab on it and the two within half its 5 mm thickness
