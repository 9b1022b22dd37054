"""Model manifests: what a registered ONNX model accepts and how to feed and read it.

A manifest is plain data (YAML or JSON). `manifest_problems` returns every problem at once,
each naming its field, so a site fixes a manifest in one pass instead of one error per run.

    name: demo-hyperdense-head-ct          # letters, digits, . _ -
    version: "1.0"                         # a string: 1.10 as a YAML number would become 1.1
    file: demo-hyperdense-head-ct-1.0.onnx # relative to the manifest's folder
    sha256: <64 hex digits of the file>    # checked at registration and whenever a session loads
    intended_use: free text
    demonstration: false                   # true only for PacsLens's own demonstration model
    accepts: {modalities: [CT], body_parts: [HEAD, BRAIN]}   # body_parts empty or absent: any
    series: {orientation: axial, min_slices: 16, max_slices: 2000, choose: most_slices}
    input:
      name: volume                         # the ONNX input
      shape: [1, 1, 48, 128, 128]          # [1, 1, D, H, W] or [1, D, H, W], float32
      rescale: hu                          # hu: apply RescaleSlope/Intercept; none: stored values
      window: null                         # or {center: 40, width: 80}: clip and scale to 0..1
      resize: nearest                      # in-plane resampling to H x W: nearest | linear
      slices: nearest                      # slice sampling to D: nearest | mean (slab average)
      spacing: [2.5, 2.0, 2.0]             # optional, mm (z, y, x): resample to this physical voxel
                                           # grid of D x H x W, centred on the series, instead of
                                           # resize/slices (box mean in-plane, slab mean along z)
    output:
      score: score                         # the ONNX output holding the score (one number)
      threshold: 0.5                       # flagged when score >= threshold
      labels: {positive: "hyperdense region", negative: "no hyperdense region"}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

# Name and version become directories under DATA_DIR/models/: one safe path component each.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,39}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CS_RE = re.compile(r"^[A-Z0-9 _]{1,16}$")
ORIENTATIONS = ("axial", "any")
CHOOSERS = ("most_slices",)
RESCALES = ("hu", "none")
RESIZES = ("nearest", "linear")
SLICE_SAMPLINGS = ("nearest", "mean")
TOP_LEVEL = {
    "name",
    "version",
    "file",
    "sha256",
    "intended_use",
    "demonstration",
    "accepts",
    "series",
    "input",
    "output",
}


class ManifestError(Exception):
    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{key}: {problem}" for key, problem in problems.items()))


def manifest_load(path: Path) -> dict[str, Any]:
    """Read a YAML/JSON manifest file (JSON is YAML). Raises ManifestError with a readable reason."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ManifestError({"manifest": f"cannot read {path}: {exc.strerror}"}) from None
    except yaml.YAMLError as exc:
        raise ManifestError({"manifest": f"{path} is not valid YAML/JSON: {exc}"}) from None
    if not isinstance(data, dict):
        raise ManifestError({"manifest": f"{path} must hold a mapping of fields, not {type(data).__name__}"})
    return data


def manifest_normalize(data: dict[str, Any]) -> dict[str, Any]:
    """Validate and fill defaults. Raises ManifestError listing every bad field."""
    problems = manifest_problems(data)
    if problems:
        raise ManifestError(problems)
    series = data.get("series") or {}
    inp = data["input"]
    out = data["output"]
    accepts = data["accepts"]
    return {
        "name": data["name"],
        "version": data["version"],
        "file": data["file"],
        "sha256": data["sha256"],
        "intended_use": data["intended_use"].strip(),
        "demonstration": bool(data.get("demonstration", False)),
        "accepts": {
            "modalities": [m.upper() for m in accepts["modalities"]],
            "body_parts": [b.upper() for b in accepts.get("body_parts") or []],
        },
        "series": {
            "orientation": series.get("orientation", "axial"),
            "min_slices": int(series.get("min_slices", 1)),
            "max_slices": int(series.get("max_slices", 10000)),
            "choose": series.get("choose", "most_slices"),
        },
        "input": {
            "name": inp["name"],
            "shape": [int(d) for d in inp["shape"]],
            "rescale": inp.get("rescale", "hu"),
            "window": inp.get("window"),
            "resize": inp.get("resize", "linear"),
            "slices": inp.get("slices", "nearest"),
            # Only when given: manifests registered before the field existed stay identical.
            **({"spacing": [float(v) for v in inp["spacing"]]} if inp.get("spacing") is not None else {}),
        },
        "output": {
            "score": out["score"],
            "threshold": float(out["threshold"]),
            "labels": dict(out.get("labels") or {}),
        },
    }


def manifest_problems(data: dict[str, Any]) -> dict[str, str]:
    p: dict[str, str] = {}
    for key in sorted(set(data) - TOP_LEVEL):
        p[key] = f"unknown field (known: {', '.join(sorted(TOP_LEVEL))})"
    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        p["name"] = "required: 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit, no '..'"
    version = data.get("version")
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version) or ".." in version:
        p["version"] = (
            "required: a string of 1-40 letters, digits, '.', '_', '+' or '-', starting with a letter or digit, "
            "no '..' or slashes (quote numbers: \"1.0\")"
        )
    file = data.get("file")
    if not isinstance(file, str) or not file.strip():
        p["file"] = "required: the ONNX file's path, relative to the manifest"
    sha = data.get("sha256")
    if not isinstance(sha, str) or not SHA256_RE.match(sha):
        p["sha256"] = "required: the file's SHA-256 as 64 lowercase hex digits (sha256sum prints it)"
    use = data.get("intended_use")
    if not isinstance(use, str) or not use.strip():
        p["intended_use"] = "required: say what the model is for and what it is not for"
    if "demonstration" in data and not isinstance(data["demonstration"], bool):
        p["demonstration"] = "must be true or false"
    _check_accepts(data.get("accepts"), p)
    _check_series(data.get("series"), p)
    _check_input(data.get("input"), p)
    _check_output(data.get("output"), p)
    return p


def _check_accepts(accepts: Any, p: dict[str, str]) -> None:
    if not isinstance(accepts, dict):
        p["accepts"] = "required: {modalities: [CT], body_parts: [HEAD]}"
        return
    modalities = accepts.get("modalities")
    if not _cs_list(modalities) or not modalities:
        p["accepts.modalities"] = "required: a non-empty list of DICOM modality codes such as [CT]"
    body_parts = accepts.get("body_parts")
    if body_parts is not None and not _cs_list(body_parts):
        p["accepts.body_parts"] = "must be a list of Body Part Examined codes such as [HEAD, BRAIN] (empty: any)"
    for key in sorted(set(accepts) - {"modalities", "body_parts"}):
        p[f"accepts.{key}"] = "unknown field (known: modalities, body_parts)"


def _check_series(series: Any, p: dict[str, str]) -> None:
    if series is None:
        return
    if not isinstance(series, dict):
        p["series"] = "must be a mapping: {orientation: axial, min_slices: 16, max_slices: 2000}"
        return
    if series.get("orientation", "axial") not in ORIENTATIONS:
        p["series.orientation"] = f"must be one of {', '.join(ORIENTATIONS)}"
    if series.get("choose", "most_slices") not in CHOOSERS:
        p["series.choose"] = f"must be one of {', '.join(CHOOSERS)}"
    low, high = series.get("min_slices", 1), series.get("max_slices", 10000)
    if not _positive_int(low):
        p["series.min_slices"] = "must be a whole number of at least 1"
    if not _positive_int(high):
        p["series.max_slices"] = "must be a whole number of at least 1"
    elif _positive_int(low) and high < low:
        p["series.max_slices"] = f"must be at least min_slices ({low})"
    for key in sorted(set(series) - {"orientation", "min_slices", "max_slices", "choose"}):
        p[f"series.{key}"] = "unknown field (known: orientation, min_slices, max_slices, choose)"


def _check_input(inp: Any, p: dict[str, str]) -> None:
    if not isinstance(inp, dict):
        p["input"] = "required: {name: ..., shape: [1, 1, D, H, W], ...}"
        return
    if not isinstance(inp.get("name"), str) or not inp["name"]:
        p["input.name"] = "required: the name of the model's ONNX input"
    shape = inp.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) not in (4, 5)
        or not all(_positive_int(d) for d in shape)
        or any(d != 1 for d in shape[:-3])
    ):
        p["input.shape"] = "required: [1, 1, D, H, W] or [1, D, H, W] with positive whole numbers"
    if inp.get("rescale", "hu") not in RESCALES:
        p["input.rescale"] = f"must be one of {', '.join(RESCALES)}"
    window = inp.get("window")
    if window is not None and not (
        isinstance(window, dict)
        and set(window) == {"center", "width"}
        and all(isinstance(window[k], (int, float)) and not isinstance(window[k], bool) for k in window)
        and window["width"] > 0
    ):
        p["input.window"] = "must be null or {center: number, width: positive number}"
    if inp.get("resize", "linear") not in RESIZES:
        p["input.resize"] = f"must be one of {', '.join(RESIZES)}"
    if inp.get("slices", "nearest") not in SLICE_SAMPLINGS:
        p["input.slices"] = f"must be one of {', '.join(SLICE_SAMPLINGS)}"
    spacing = inp.get("spacing")
    if spacing is not None and not (
        isinstance(spacing, list)
        and len(spacing) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.05 <= v <= 50 for v in spacing)
    ):
        p["input.spacing"] = "must be null or [z, y, x] voxel spacing in mm, each between 0.05 and 50"
    known = ("name", "shape", "rescale", "window", "resize", "slices", "spacing")
    for key in sorted(set(inp) - set(known)):
        p[f"input.{key}"] = f"unknown field (known: {', '.join(known)})"


def _check_output(out: Any, p: dict[str, str]) -> None:
    if not isinstance(out, dict):
        p["output"] = "required: {score: <output name>, threshold: number}"
        return
    if not isinstance(out.get("score"), str) or not out["score"]:
        p["output.score"] = "required: the name of the ONNX output that holds the score"
    threshold = out.get("threshold")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        p["output.threshold"] = "required: a number; a score at or above it is flagged"
    labels = out.get("labels")
    if labels is not None and not (
        isinstance(labels, dict)
        and set(labels) <= {"positive", "negative"}
        and all(isinstance(v, str) for v in labels.values())
    ):
        p["output.labels"] = "must be {positive: text, negative: text}"
    for key in sorted(set(out) - {"score", "threshold", "labels"}):
        p[f"output.{key}"] = "unknown field (known: score, threshold, labels)"


def _cs_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and CS_RE.match(v.upper()) for v in value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
