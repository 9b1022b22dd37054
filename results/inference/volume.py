"""From a study's files to a model's input tensor: choose the series, load pixels, preprocess.

Loading reads every header of the chosen series (to sort slices by position) but decodes pixel
data only for the slices the model's input needs. Headers of uncompressed files come from a
small element-stream reader (routing.store.header) that also notes where Pixel Data starts,
so those pixels are one numpy read; compressed transfer syntaxes go through pydicom's
pixel-data plugins (pylibjpeg, pyjpegls).
"""

from __future__ import annotations

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


def volume_load(*, chosen: ChosenSeries, indices: list[int]) -> LoadedVolume:
    """Pixel data of the slices at `indices` (positions in chosen.slices). Raises UnreadablePixels."""
    first = chosen.slices[0].header
    assert first.rows is not None and first.columns is not None  # choosing skips slices without dimensions
    rows, cols = int(first.rows), int(first.columns)
    dtype = _stored_dtype(first)
    stored = np.empty((len(indices), rows, cols), dtype=dtype)
    slopes = np.ones(len(indices), dtype=np.float32)
    intercepts = np.zeros(len(indices), dtype=np.float32)
    for out, index in enumerate(indices):
        item = chosen.slices[index]
        try:
            stored[out] = _read_pixels(item, rows=rows, cols=cols, dtype=dtype)
        except UnreadablePixels:
            raise
        except Exception as exc:  # pydicom and the decoders raise many types for bad data
            raise UnreadablePixels(f"instance {item.instance_id}: {type(exc).__name__}: {str(exc)[:200]}") from None
        slopes[out] = item.header.rescale_slope
        intercepts[out] = item.header.rescale_intercept
    return LoadedVolume(stored=stored, slopes=slopes, intercepts=intercepts, source_slices=len(chosen.slices))


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
    slices: list[Slice] = []
    normal: np.ndarray | None = None
    for instance in instances:
        path = data_dir / instance.path
        try:
            header = slice_header_read(path)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            return f"instance {instance.pk} cannot be read ({type(exc).__name__})", []
        if normal is None:
            normal = _slice_normal(header.orientation)
            if normal is None:
                return "no usable Image Orientation (Patient)", []
            if orientation == "axial" and abs(normal[2]) < AXIAL_MIN_COSINE:
                return "not axial", []
        if not header.rows or not header.columns:
            return f"instance {instance.pk} has no image (Rows/Columns missing)", []
        if header.position and len(header.position) == 3:
            along = float(np.dot(normal, header.position))
        else:
            along = float(header.instance_number or instance.instance_number or 0)
        slices.append(Slice(instance_id=instance.pk, path=path, position=along, header=header))
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
