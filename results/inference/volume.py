"""From a study's files to a model's input tensor: choose the series, load pixels, preprocess.

Loading reads every header of the chosen series (to sort slices by position) but decodes pixel
data only for the slices the model's input needs. A model whose manifest gives a voxel
`spacing` in millimetres gets the volume resampled to that physical grid (box average in-plane
from Pixel Spacing, slab mean or linear interpolation along the slices from their positions),
one slice at a time: memory stays at one source slice plus the model's input, whether the
series has 10 slices or 600. Headers of uncompressed files come from a
small element-stream reader (routing.store.header) that also notes where Pixel Data starts,
so those pixels are one numpy read; compressed transfer syntaxes go through pydicom's
pixel-data plugins (pylibjpeg, pyjpegls).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from django.conf import settings
from django.db.models import Count, Q
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from routing.models import Instance, Series, Study
from routing.store.header import SliceHeader, slice_header_read

UNCOMPRESSED_LE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
AXIAL_MIN_COSINE = 0.9  # slice normal within ~25 degrees of the patient's z axis


class NotApplicable(Exception):
    """The study is not what the model accepts (modality, body part): not an error."""


class NoSuitableSeries(Exception):
    pass


class UnreadablePixels(Exception):
    pass


@dataclass
class Slice:
    instance_id: int
    path: Path
    position: float
    header: SliceHeader


@dataclass
class ChosenSeries:
    series: Series
    slices: list[Slice]  # sorted along the slice normal, feet to head for axial


@dataclass
class LoadedVolume:
    stored: np.ndarray  # (k, rows, cols) as stored
    slopes: np.ndarray  # (k,)
    intercepts: np.ndarray  # (k,)
    source_slices: int


def series_choose(*, study: Study, manifest: dict[str, Any]) -> ChosenSeries:
    """The series the model should see: accepted modality and body part, the slice-count range,
    the right orientation, the most slices. Raises NotApplicable or NoSuitableSeries."""
    accepts, rules = manifest["accepts"], manifest["series"]
    all_series = list(
        study.series.annotate(images=Count("instances", filter=Q(instances__deleted_at=None) & ~Q(instances__path="")))
    )
    modalities = sorted({s.modality.upper() for s in all_series if s.modality})
    candidates = [s for s in all_series if s.modality.upper() in accepts["modalities"]]
    if not candidates:
        raise NotApplicable(
            f"the model accepts {'/'.join(accepts['modalities'])}; the study has {'/'.join(modalities) or 'no modality'}"
        )
    if accepts["body_parts"]:
        parts = sorted({s.body_part_examined.upper() or "(none)" for s in candidates})
        candidates = [s for s in candidates if s.body_part_examined.strip().upper() in accepts["body_parts"]]
        if not candidates:
            raise NotApplicable(
                f"the model accepts body part {'/'.join(accepts['body_parts'])}; the series have {'/'.join(parts)}"
            )
    low, high = rules["min_slices"], rules["max_slices"]
    misses = []
    for series in sorted(candidates, key=lambda s: (-s.images, s.pk)):
        if not low <= series.images <= high:
            misses.append(f"series {series.series_instance_uid} has {series.images} images (needs {low}-{high})")
            continue
        problem, slices = _series_slices(series, orientation=rules["orientation"])
        if problem:
            misses.append(f"series {series.series_instance_uid}: {problem}")
            continue
        return ChosenSeries(series=series, slices=slices)
    raise NoSuitableSeries("; ".join(misses))


def volume_slice_indices(*, slices: list[Slice], manifest: dict[str, Any]) -> list[int]:
    """Which of the sorted `slices` the model's input is made of (the SR cites these)."""
    spec = manifest["input"]
    if spec.get("spacing"):
        weights = _z_weights(slices=slices, depth=spec["shape"][-3], spacing=spec["spacing"][0])
        return [int(i) for i in np.flatnonzero(weights.any(axis=0))]
    return slice_indices(count=len(slices), depth=spec["shape"][-3], sampling=spec["slices"])


@dataclass
class Prepared:
    tensor: np.ndarray
    load_seconds: float  # reading and decoding pixels
    preprocess_seconds: float  # everything else


def volume_prepare(*, slices: list[Slice], indices: list[int], manifest: dict[str, Any]) -> Prepared:
    """The model's input tensor from the sorted `slices` (`indices` from volume_slice_indices).

    The one preprocessing function: the pipeline (services.model_infer) and evaluate_model
    both call it. Raises UnreadablePixels.
    """
    if manifest["input"].get("spacing"):
        return _resample_physical(slices=slices, indices=indices, manifest=manifest)
    started = time.perf_counter()
    volume = _slices_load(slices=slices, indices=indices)
    loaded = time.perf_counter()
    tensor = volume_preprocess(volume=volume, manifest=manifest)
    return Prepared(tensor=tensor, load_seconds=loaded - started, preprocess_seconds=time.perf_counter() - loaded)


def slices_from_files(paths: list[Path], *, orientation: str = "axial") -> list[Slice]:
    """Files outside the database (evaluate_model), sorted exactly as a received series would be.

    A slice's `instance_id` is its index in `paths`. Raises NoSuitableSeries.
    """
    problem, slices = _slices_sorted([(index, path, None) for index, path in enumerate(paths)], orientation=orientation)
    if problem:
        raise NoSuitableSeries(problem)
    return slices


def volume_load(*, chosen: ChosenSeries, indices: list[int]) -> LoadedVolume:
    """Pixel data of the slices at `indices` (positions in chosen.slices). Raises UnreadablePixels."""
    return _slices_load(slices=chosen.slices, indices=indices)


def _slices_load(*, slices: list[Slice], indices: list[int]) -> LoadedVolume:
    first = slices[0].header
    assert first.rows is not None and first.columns is not None  # choosing skips slices without dimensions
    rows, cols = int(first.rows), int(first.columns)
    dtype = _stored_dtype(first)
    stored = np.empty((len(indices), rows, cols), dtype=dtype)
    slopes = np.ones(len(indices), dtype=np.float32)
    intercepts = np.zeros(len(indices), dtype=np.float32)
    for out, index in enumerate(indices):
        item = slices[index]
        stored[out] = _read_pixels_guarded(item, rows=rows, cols=cols, dtype=dtype)
        slopes[out] = item.header.rescale_slope
        intercepts[out] = item.header.rescale_intercept
    return LoadedVolume(stored=stored, slopes=slopes, intercepts=intercepts, source_slices=len(slices))


def _read_pixels_guarded(item: Slice, *, rows: int, cols: int, dtype: np.dtype) -> np.ndarray:
    try:
        return _read_pixels(item, rows=rows, cols=cols, dtype=dtype)
    except UnreadablePixels:
        raise
    except Exception as exc:  # pydicom and the decoders raise many types for bad data
        raise UnreadablePixels(f"instance {item.instance_id}: {type(exc).__name__}: {str(exc)[:200]}") from None


def _resample_physical(*, slices: list[Slice], indices: list[int], manifest: dict[str, Any]) -> Prepared:
    """Resample to the manifest's voxel spacing, centred on the series, one source slice at a time.

    In-plane: each output pixel is the mean of the source pixels it covers (a box filter: thin
    slices' noise averages out, small bright foci are diluted, never dropped). Along the slices:
    the mean of the source slices inside each output slab, or linear interpolation between the
    two nearest when thick slices leave a slab empty. Outside the scanned field: air (-1024 HU).
    """
    spec = manifest["input"]
    depth, height, width = spec["shape"][-3:]
    spacing_z, spacing_y, spacing_x = (float(v) for v in spec["spacing"])
    fill = -1024.0 if spec["rescale"] == "hu" else 0.0
    first = slices[0].header
    assert first.rows is not None and first.columns is not None  # choosing skips slices without dimensions
    rows, cols = int(first.rows), int(first.columns)
    if not first.pixel_spacing or len(first.pixel_spacing) != 2 or min(first.pixel_spacing) <= 0:
        raise UnreadablePixels(
            f"instance {slices[0].instance_id} has no usable Pixel Spacing: the model needs millimetres"
        )
    row_mm, col_mm = (float(v) for v in first.pixel_spacing)
    y_band = _band(rows, row_mm, height, spacing_y)
    x_band = _band(cols, col_mm, width, spacing_x)
    covered = np.outer(y_band.covered, x_band.covered)
    z_weights = _z_weights(slices=slices, depth=depth, spacing=spacing_z)
    dtype = _stored_dtype(first)
    out = np.zeros((depth, height, width), dtype=np.float32)
    out_weight = z_weights.sum(axis=1)
    read_seconds = 0.0
    started = time.perf_counter()
    for index in indices:
        item = slices[index]
        began = time.perf_counter()
        stored = _read_pixels_guarded(item, rows=rows, cols=cols, dtype=dtype)
        read_seconds += time.perf_counter() - began
        # Box means are linear: resample the stored values, then rescale the small plane (the
        # intercept only where the image covers it; the rest is the fill).
        small = _band_apply(_band_apply(stored, y_band, axis=0), x_band, axis=1)
        if spec["rescale"] == "hu":
            small = small * np.float32(item.header.rescale_slope) + np.float32(item.header.rescale_intercept) * covered
        small += fill * (1 - covered)
        for target in np.flatnonzero(z_weights[:, index]):
            out[target] += z_weights[target, index] * small
    out += fill * (1 - out_weight)[:, None, None]
    if spec["window"]:
        low = spec["window"]["center"] - spec["window"]["width"] / 2
        out = (np.clip(out, low, low + spec["window"]["width"]) - low) / spec["window"]["width"]
    tensor = np.ascontiguousarray(out.reshape(spec["shape"]), dtype=np.float32)
    return Prepared(
        tensor=tensor, load_seconds=read_seconds, preprocess_seconds=time.perf_counter() - started - read_seconds
    )


@dataclass
class _Band:
    """A box-filter resampling along one axis as a banded matrix: output pixel j is the sum over t
    of weights[j, t] * source[index[j, t]]. A handful of multiply-adds per output pixel, where
    a dense (output x source) matrix product costs a hundred times more."""

    index: np.ndarray  # (size_out, K) source pixels
    weights: np.ndarray  # (size_out, K) shares, zero where unused
    covered: np.ndarray  # (size_out,) share of the output pixel inside the image


def _band(size_in: int, spacing_in: float, size_out: int, spacing_out: float) -> _Band:
    """Each output pixel the mean of the source pixels it covers; both grids centred on each other."""
    src_low = (np.arange(size_in) - size_in / 2) * spacing_in
    dst_low = (np.arange(size_out) - size_out / 2) * spacing_out
    overlap = np.minimum(dst_low[:, None] + spacing_out, src_low[None, :] + spacing_in) - np.maximum(
        dst_low[:, None], src_low[None, :]
    )
    dense = np.clip(overlap, 0, None) / spacing_out
    nonzero = dense > 0
    starts = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), 0)
    width = max(1, int(nonzero.sum(axis=1).max()))
    wanted = starts[:, None] + np.arange(width)
    index = np.minimum(wanted, size_in - 1)
    weights = np.where(wanted < size_in, np.take_along_axis(dense, index, axis=1), 0)
    return _Band(index=index, weights=weights.astype(np.float32), covered=dense.sum(axis=1).astype(np.float32))


def _band_apply(plane: np.ndarray, band: _Band, *, axis: int) -> np.ndarray:
    out: np.ndarray | None = None
    for t in range(band.index.shape[1]):
        if axis == 0:
            term = band.weights[:, t, None] * plane[band.index[:, t]]
        else:
            term = band.weights[None, :, t] * plane[:, band.index[:, t]]
        out = term if out is None else out + term
    assert out is not None
    return out


def _z_weights(*, slices: list[Slice], depth: int, spacing: float) -> np.ndarray:
    """(depth, len(slices)): how much each source slice contributes to each output slab.

    Slabs are `spacing` apart, centred on the middle of the series. A slab holding source slices
    averages them; an empty slab between two slices interpolates linearly; beyond the ends, a
    slab within half a slice thickness of the end slice takes it, farther ones stay empty (air).
    """
    positions = np.array([s.position for s in slices], dtype=np.float64)
    if not all(s.header.position and len(s.header.position) == 3 for s in slices):
        # Sorted by Instance Number, no positions: the slices are taken as Slice Thickness apart.
        positions = np.arange(len(slices), dtype=np.float64) * float(slices[0].header.slice_thickness or spacing)
    weights = np.zeros((depth, len(slices)), dtype=np.float32)
    if not len(positions):
        return weights
    middle = (positions[0] + positions[-1]) / 2
    if len(positions) > 1:
        thickness = float(np.median(np.diff(positions)))
    else:
        thickness = slices[0].header.slice_thickness or spacing
    thickness = max(thickness, 1e-3)
    for target in range(depth):
        centre = middle + (target - (depth - 1) / 2) * spacing
        inside = np.flatnonzero((positions >= centre - spacing / 2) & (positions < centre + spacing / 2))
        if len(inside):
            weights[target, inside] = 1 / len(inside)
            continue
        above = int(np.searchsorted(positions, centre))
        if 0 < above < len(positions):
            low, high = positions[above - 1], positions[above]
            share = (centre - low) / (high - low) if high > low else 0.5
            weights[target, above - 1] = 1 - share
            weights[target, above] = share
        elif above == 0 and positions[0] - centre <= thickness / 2:
            weights[target, 0] = 1
        elif above == len(positions) and centre - positions[-1] <= thickness / 2:
            weights[target, -1] = 1
    return weights


def slice_indices(*, count: int, depth: int, sampling: str) -> list[int]:
    """Which source slices to load: `depth` evenly spaced for nearest, all of them for mean."""
    if sampling == "mean":
        return list(range(count))
    return [int(i) for i in np.floor((np.arange(depth) + 0.5) * count / depth).astype(int)]


def volume_preprocess(*, volume: LoadedVolume, manifest: dict[str, Any]) -> np.ndarray:
    """Resize in-plane, sample slices, rescale, window, shape: the model's float32 input tensor."""
    spec = manifest["input"]
    depth, height, width = spec["shape"][-3:]
    stored = volume.stored
    # Resampling is linear with weights summing to one, so it commutes with the per-slice affine
    # rescale: resize first and rescale the small array.
    if spec["resize"] == "nearest":
        rows = np.floor((np.arange(height) + 0.5) * stored.shape[1] / height).astype(int)
        cols = np.floor((np.arange(width) + 0.5) * stored.shape[2] / width).astype(int)
        small = stored[:, rows][:, :, cols].astype(np.float32)
    else:
        wy = _linear_weights(stored.shape[1], height)
        wx = _linear_weights(stored.shape[2], width)
        small = np.einsum("hr,krc,wc->khw", wy, stored.astype(np.float32), wx, optimize=True)
    if spec["rescale"] == "hu":
        small = small * volume.slopes[:, None, None] + volume.intercepts[:, None, None]
    if spec["slices"] == "mean":
        small = np.stack([slab.mean(axis=0) for slab in np.array_split(small, depth, axis=0)])
    if spec["window"]:
        low = spec["window"]["center"] - spec["window"]["width"] / 2
        small = (np.clip(small, low, low + spec["window"]["width"]) - low) / spec["window"]["width"]
    return np.ascontiguousarray(small.reshape(spec["shape"]), dtype=np.float32)


def _series_slices(series: Series, *, orientation: str) -> tuple[str, list[Slice]]:
    instances = list(
        Instance.objects.filter(series=series, deleted_at=None).exclude(path="").order_by("instance_number", "id")
    )
    data_dir = Path(settings.DATA_DIR)
    return _slices_sorted(
        [(instance.pk, data_dir / instance.path, instance.instance_number) for instance in instances],
        orientation=orientation,
    )


def _slices_sorted(items: list[tuple[int, Path, int | None]], *, orientation: str) -> tuple[str, list[Slice]]:
    slices: list[Slice] = []
    normal: np.ndarray | None = None
    for instance_id, path, instance_number in items:
        try:
            header = slice_header_read(path)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            return f"instance {instance_id} cannot be read ({type(exc).__name__})", []
        if normal is None:
            normal = _slice_normal(header.orientation)
            if normal is None:
                return "no usable Image Orientation (Patient)", []
            if orientation == "axial" and abs(normal[2]) < AXIAL_MIN_COSINE:
                return "not axial", []
        if not header.rows or not header.columns:
            return f"instance {instance_id} has no image (Rows/Columns missing)", []
        if header.position and len(header.position) == 3:
            along = float(np.dot(normal, header.position))
        else:
            along = float(header.instance_number or instance_number or 0)
        slices.append(Slice(instance_id=instance_id, path=path, position=along, header=header))
    shapes = {(s.header.rows, s.header.columns) for s in slices}
    if len(shapes) > 1:
        return f"images of different sizes {sorted(shapes)}", []
    slices.sort(key=lambda s: s.position)
    return "", slices


def _slice_normal(orientation: list[float] | None) -> np.ndarray | None:
    if not orientation or len(orientation) != 6:
        return None
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    length = np.linalg.norm(normal)
    return normal / length if length > 1e-6 else None


def _stored_dtype(header: SliceHeader) -> np.dtype:
    if header.samples_per_pixel != 1:
        raise UnreadablePixels("only single-sample (greyscale) images are supported")
    if header.bits_allocated not in (8, 16):
        raise UnreadablePixels(f"Bits Allocated {header.bits_allocated} is not supported (8 or 16)")
    signed = header.pixel_representation == 1
    return np.dtype(f"{'i' if signed else 'u'}{header.bits_allocated // 8}").newbyteorder("<")


def _read_pixels(item: Slice, *, rows: int, cols: int, dtype: np.dtype) -> np.ndarray:
    header = item.header
    expected = rows * cols * dtype.itemsize
    if header.pixel_offset is not None:
        # Uncompressed, located by the fast header reader: one read straight into numpy.
        if (header.rows, header.columns) != (rows, cols):
            raise UnreadablePixels(
                f"instance {item.instance_id} is {header.rows}x{header.columns}, the series is {rows}x{cols}"
            )
        if (header.pixel_length or 0) < expected:
            raise UnreadablePixels(
                f"instance {item.instance_id}: Pixel Data has {header.pixel_length} bytes, {expected} expected"
            )
        pixels = np.fromfile(item.path, dtype=dtype, count=rows * cols, offset=header.pixel_offset)
        if pixels.size != rows * cols:
            raise UnreadablePixels(f"instance {item.instance_id}: the file ends inside its Pixel Data")
        return pixels.reshape(rows, cols)
    ds = pydicom.dcmread(item.path)
    if "PixelData" not in ds:
        raise UnreadablePixels(f"instance {item.instance_id} has no Pixel Data")
    if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
        raise UnreadablePixels(f"instance {item.instance_id} is {ds.Rows}x{ds.Columns}, the series is {rows}x{cols}")
    if ds.file_meta.TransferSyntaxUID in UNCOMPRESSED_LE:
        raw = ds.PixelData
        if len(raw) < expected:
            raise UnreadablePixels(f"instance {item.instance_id}: Pixel Data has {len(raw)} bytes, {expected} expected")
        return np.frombuffer(raw, dtype=dtype, count=rows * cols).reshape(rows, cols)
    return ds.pixel_array


def _linear_weights(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) matrix for linear resampling with pixel centres aligned."""
    centres = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
    centres = np.clip(centres, 0, size_in - 1)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    frac = (centres - low).astype(np.float32)
    weights = np.zeros((size_out, size_in), dtype=np.float32)
    weights[np.arange(size_out), low] += 1 - frac
    weights[np.arange(size_out), high] += frac
    return weights
