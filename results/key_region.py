"""Where a flagged finding is: the key slice and the region to outline on it.

Found by our code in the Hounsfield-unit volume the model read, not read from the model: a
registered model exposes one score (results/inference/manifest.py), so the summary image and
the key object selection must not depend on what else a model outputs. The region is the
largest connected patch of denoised soft tissue at hyperdense (acute blood) density away from
bone, on the slice where that density covers the most pixels:

    smooth = 5x5 in-plane mean of the slice in HU        (ordinary CT noise averages out)
    bone   = HU > 150, grown by 3 pixels                  (skull, calcifications, their edges)
    dense  = 50 <= smooth <= 90 HU, not bone, opened 3x3  (specks dropped)

(slices of 384 pixels or more a side are read at half resolution; see `region_mask`).

The inference step stores the key instance and the region's bounding box on the result
(`InferenceResult.key_region`); the summary image recomputes the outline inside that box from
the same instance with `region_mask`, so both always agree and nothing big is stored.
Used by results/inference (to find) and results/deliver (to draw); imports neither.
"""

from __future__ import annotations

from collections import deque

import numpy as np

DENSE_HU = (50.0, 90.0)
BONE_HU = 150.0
SMOOTH = 5  # pixels, in-plane box
BONE_MARGIN = 3  # pixels
MIN_PIXELS = 12  # fewer dense pixels on the best slice: no region worth outlining


def key_region_find(*, volume, instance_ids: list[int]) -> dict | None:
    """The key slice (its Instance id) and the region's bounding box, or None.

    `volume` is a results.inference.volume.LoadedVolume (slices as stored, with their rescale)
    and `instance_ids[k]` the Instance row of its slice k.
    """
    best: tuple[int, int, np.ndarray, int] | None = None  # (pixels, slice, mask, scale)
    for k in range(volume.stored.shape[0]):
        hu = volume.stored[k].astype(np.float32) * np.float32(volume.slopes[k]) + np.float32(volume.intercepts[k])
        mask, scale = working_mask(hu)
        count = int(mask.sum()) * scale * scale
        if count >= MIN_PIXELS and (best is None or count > best[0]):
            best = (count, k, mask, scale)
    if best is None:
        return None
    _, k, mask, scale = best
    component = largest_component(mask)
    rows, cols = np.nonzero(component)
    height, width = volume.stored.shape[1:]
    return {
        "instance": int(instance_ids[k]),
        "bbox": [
            int(rows.min()) * scale,
            int(cols.min()) * scale,
            min((int(rows.max()) + 1) * scale, height) - 1,
            min((int(cols.max()) + 1) * scale, width) - 1,
        ],
        "pixels": int(component.sum()) * scale * scale,
    }


def region_mask(hu: np.ndarray) -> np.ndarray:
    """Pixels of a 2-D slice (in HU) at hyperdense soft-tissue density, away from bone, at the
    slice's own resolution."""
    mask, scale = working_mask(hu)
    if scale == 1:
        return mask
    return np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)[: hu.shape[0], : hu.shape[1]]


def working_mask(hu: np.ndarray) -> tuple[np.ndarray, int]:
    """The mask and the scale it was found at. A large matrix (>= 384 pixels a side, a head at
    0.5 mm) is read at half resolution, 2 x 2 blocks averaged: a quarter of the work, with the
    smoothing and bone margin about the same size in millimetres."""
    if min(hu.shape) < 384:
        return _mask(hu, smooth=SMOOTH, margin=BONE_MARGIN), 1
    height, width = hu.shape
    even = np.pad(hu, ((0, height % 2), (0, width % 2)), mode="edge")
    half = (even[0::2, 0::2] + even[1::2, 0::2] + even[0::2, 1::2] + even[1::2, 1::2]) * np.float32(0.25)
    return _mask(half, smooth=SMOOTH // 2 + 1, margin=BONE_MARGIN // 2 + 1), 2


def _mask(hu: np.ndarray, *, smooth: int, margin: int) -> np.ndarray:
    smoothed = _box_mean(hu, smooth)
    bone = _dilate(hu > BONE_HU, margin)
    dense = (smoothed >= DENSE_HU[0]) & (smoothed <= DENSE_HU[1]) & ~bone
    return _dilate(_erode(dense, 1), 1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected patch of `mask` (ties: the first in row order)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size = 0, 0
    height, width = mask.shape
    label = 0
    for r, c in zip(*np.nonzero(mask), strict=True):
        if labels[r, c]:
            continue
        label += 1
        labels[r, c] = label
        size = 0
        queue = deque([(int(r), int(c))])
        while queue:
            y, x = queue.popleft()
            size += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = label
                        queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_label else np.zeros(mask.shape, dtype=bool)


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels: in the mask, with a 4-neighbour outside it."""
    return mask & ~_erode(mask, 1)


def _box_mean(image: np.ndarray, size: int) -> np.ndarray:
    """Separable box mean (edges repeated): a few float32 adds per pixel, no cumulative sums."""
    pad = size // 2
    padded = np.pad(image.astype(np.float32, copy=False), pad, mode="edge")
    rows = padded[: padded.shape[0] - size + 1].copy()
    for offset in range(1, size):
        rows += padded[offset : offset + image.shape[0]]
    total = rows[:, : rows.shape[1] - size + 1].copy()
    for offset in range(1, size):
        total += rows[:, offset : offset + image.shape[1]]
    return total / (size * size)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square max-filter, separable: OR of shifted copies along rows, then along columns."""
    return _shift_reduce(_shift_reduce(mask, radius, 0, np.logical_or), radius, 1, np.logical_or)


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    # Outside the image counts as outside the mask.
    return _shift_reduce(_shift_reduce(mask, radius, 0, np.logical_and), radius, 1, np.logical_and)


def _shift_reduce(mask: np.ndarray, radius: int, axis: int, op) -> np.ndarray:
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    padded = np.pad(mask, pad, mode="constant", constant_values=False)
    moved = np.moveaxis(padded, axis, 0)
    length = mask.shape[axis]
    out = moved[:length].copy()
    for offset in range(1, 2 * radius + 1):
        op(out, moved[offset : offset + length], out=out)
    return np.moveaxis(out, 0, axis)
