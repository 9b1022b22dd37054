"""Evaluating a registered model on labelled studies: generated ones (a seeded case mix of
synthetic head CTs) or a folder of real ones with a CSV of Study Instance UID -> label.

Each study goes through the pipeline's own code: the slices are sorted as a received series
is (volume.slices_from_files), preprocessed by volume_prepare, run in the cached, verified
onnxruntime session (runtime.session_for / session_run) and read by services.outputs_read.
Nothing is stored in the database.

The report: sensitivity, specificity, AUC and the confusion table, overall and per
condition (noise, calcification, lesion size, slice thickness, ...), and time per study.
"""

from __future__ import annotations

import csv
import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from django.conf import settings

from pacslens.demo_study import LesionSpec, Realism, demo_study_write
from results.inference.runtime import session_for, session_run
from results.inference.services import outputs_read
from results.inference.volume import (
    NoSuitableSeries,
    UnreadablePixels,
    slices_from_files,
    volume_prepare,
    volume_slice_indices,
)
from results.models import AIModel, InferenceResult, ResultStatus

# The generated mix: what a head CT triage model meets, drawn at random per case.
NOISE_SD = (4.0, 8.0, 12.0)
BEAM_HARDENING = (0.0, 15.0, 30.0)
THICKNESS_MM = (0.625, 1.25, 2.5, 5.0)
LESION_ML = {"0.5-1 mL": (0.5, 1.0), "1-5 mL": (1.0, 5.0), "5-20 mL": (5.0, 20.0)}
LESION_HU = (50.0, 90.0)
FIELD_OF_VIEW_MM = 240.0
CONDITIONS = ("noise", "calcification", "beam hardening", "lesion size", "lesion density", "slice thickness", "slices")


@dataclass
class Case:
    """One labelled study to evaluate: `write(directory)` produces its files."""

    label: bool
    conditions: dict[str, str]
    write: Callable[[Path], list[Path]]


@dataclass
class Outcome:
    label: bool
    conditions: dict[str, str]
    score: float | None = None
    flagged: bool = False
    seconds: float = 0.0  # reading, preprocessing and running: what the pipeline spends
    error: str = ""


@dataclass
class Metrics:
    n: int
    tp: int
    fn: int
    fp: int
    tn: int
    errors: int
    auc: float | None
    sensitivity: float | None = field(init=False)
    specificity: float | None = field(init=False)

    def __post_init__(self) -> None:
        self.sensitivity = self.tp / (self.tp + self.fn) if self.tp + self.fn else None
        self.specificity = self.tn / (self.tn + self.fp) if self.tn + self.fp else None


def case_mix(*, cases: int, seed: int) -> list[Case]:
    """`cases` synthetic head CTs, half with a hyperdense lesion, conditions drawn from `seed`.

    Every clean study has realistic trouble in it at random: noise up to 12 HU, calcifications,
    a beam-hardening band, thin or thick slices, 0.4-1.0 mm pixels, signed or unsigned storage;
    a few have 1-8 slices or 600. Lesions are 0.5-20 mL at 50-90 HU anywhere in the brain.
    """
    rng = np.random.default_rng(seed)
    mix = []
    for index in range(cases):
        label = index % 2 == 1
        noise = float(rng.choice(NOISE_SD))
        calcified = bool(rng.random() < 0.5)
        beam = float(rng.choice(BEAM_HARDENING))
        thickness = float(rng.choice(THICKNESS_MM))
        spacing = round(float(rng.uniform(0.4, 1.0)), 3)
        storage = "signed" if rng.random() < 0.3 else "unsigned"
        syntax = "rle" if rng.random() < 0.1 else "explicit"
        slices = max(1, round(150 / thickness))
        extent = rng.random()
        if not label and extent < 0.05:
            slices = int(rng.integers(1, 9))
        elif extent > 0.97:
            thickness, slices = 0.625, 600
        lesion: LesionSpec | None = None
        size_label = "none"
        density_label = "none"
        if label:
            size_label = str(rng.choice(list(LESION_ML)))
            low, high = LESION_ML[size_label]
            hu = float(rng.uniform(*LESION_HU))
            density_label = "50-70 HU" if hu < 70 else "70-90 HU"
            lesion = LesionSpec(ml=float(np.exp(rng.uniform(math.log(low), math.log(high)))), hu=hu)
        size = min(512, 2 * round(FIELD_OF_VIEW_MM / spacing / 2))
        study_seed = int(rng.integers(0, 2**31))
        kwargs: dict[str, Any] = dict(
            lesion=lesion or False,
            slices=slices,
            slice_thickness=thickness,
            pixel_spacing=spacing,
            size=size,
            storage=storage,
            transfer_syntax=syntax,
            seed=study_seed,
            realism=Realism(noise_sd=noise, calcifications=calcified, beam_hardening=beam),
        )
        conditions = {
            "noise": f"σ {noise:g} HU",
            "calcification": "yes" if calcified else "no",
            "beam hardening": f"{beam:g} HU" if beam else "none",
            "lesion size": size_label,
            "lesion density": density_label,
            "slice thickness": f"{thickness:g} mm",
            "slices": "1-8" if slices <= 8 else ("600" if slices == 600 else "head"),
        }
        mix.append(Case(label=label, conditions=conditions, write=_writer(kwargs)))
    return mix


def _writer(kwargs: dict[str, Any]) -> Callable[[Path], list[Path]]:
    def write(directory: Path) -> list[Path]:
        return demo_study_write(outdir=directory, **kwargs).paths

    return write


def _listed(paths: list[Path]) -> Callable[[Path], list[Path]]:
    def write(_directory: Path) -> list[Path]:
        return paths

    return write


def folder_cases(*, folder: Path, labels_csv: Path) -> list[Case]:
    """Labelled studies from a folder of DICOM files (any depth) and a CSV with a header row:
    StudyInstanceUID, label (1/0, yes/no, true/false, positive/negative), and optionally more
    columns, which become conditions of the per-condition table."""
    labels: dict[str, tuple[bool, dict[str, str]]] = {}
    with open(labels_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if "StudyInstanceUID" not in fields or "label" not in fields:
            raise ValueError(f"{labels_csv} needs a header row with StudyInstanceUID and label columns")
        for line, row in enumerate(reader, start=2):
            value = (row["label"] or "").strip().lower()
            if value not in ("1", "0", "yes", "no", "true", "false", "positive", "negative"):
                raise ValueError(
                    f"{labels_csv} line {line}: label must be 1/0, yes/no, true/false or positive/negative"
                )
            extra = {k: (v or "").strip() for k, v in row.items() if k not in ("StudyInstanceUID", "label") and k}
            labels[(row["StudyInstanceUID"] or "").strip()] = (value in ("1", "yes", "true", "positive"), extra)
    by_study: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p != labels_csv):
        try:
            uid = str(
                pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID
            )
        except Exception:  # not DICOM, or no Study Instance UID: not part of any labelled study
            continue
        if uid in labels:
            by_study[uid].append(path)
    cases = []
    for uid, (label, extra) in labels.items():
        paths = by_study.get(uid, [])
        cases.append(Case(label=label, conditions=extra, write=_listed(paths)))
    return cases


def evaluate(
    *, model: AIModel, cases: list[Case], progress: Callable[[int, Outcome], None] | None = None
) -> list[Outcome]:
    """Run `model` on every case as the pipeline would; generated files are deleted after each."""
    session = session_for(model)
    outcomes = []
    for number, case in enumerate(cases, start=1):
        with tempfile.TemporaryDirectory(prefix="pacslens-eval-") as tmp:
            paths = case.write(Path(tmp))
            outcome = _run_one(model=model, session=session, case=case, paths=paths)
        outcomes.append(outcome)
        if progress:
            progress(number, outcome)
    return outcomes


def _run_one(*, model: AIModel, session: Any, case: Case, paths: list[Path]) -> Outcome:
    manifest = model.manifest
    outcome = Outcome(label=case.label, conditions=case.conditions)
    started = time.perf_counter()
    try:
        chosen = _series_of(paths=paths, manifest=manifest)
        indices = volume_slice_indices(slices=chosen, manifest=manifest)
        prepared = volume_prepare(slices=chosen, indices=indices, manifest=manifest)
        outputs = session_run(
            session, input_name=manifest["input"]["name"], tensor=prepared.tensor, timeout=settings.INFERENCE_TIMEOUT
        )
    except (NoSuitableSeries, UnreadablePixels) as exc:
        outcome.error = str(exc)[:300]
        return outcome
    except Exception as exc:  # onnxruntime and the decoders raise their own types
        outcome.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        return outcome
    result = outputs_read(InferenceResult(), outputs=outputs, manifest=manifest)
    outcome.seconds = time.perf_counter() - started
    if result.status != ResultStatus.SUCCEEDED:
        outcome.error = result.message
        return outcome
    outcome.score, outcome.flagged = result.score, bool(result.flagged)
    return outcome


def _series_of(*, paths: list[Path], manifest: dict[str, Any]):
    """The series the pipeline would choose among these files (series_choose's rules)."""
    if not paths:
        raise NoSuitableSeries("no files for this study")
    accepts, rules = manifest["accepts"], manifest["series"]
    series: dict[str, list[Path]] = defaultdict(list)
    kinds: dict[str, tuple[str, str]] = {}
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uid = str(ds.get("SeriesInstanceUID", ""))
        series[uid].append(path)
        kinds[uid] = (str(ds.get("Modality", "")).upper(), str(ds.get("BodyPartExamined", "")).strip().upper())
    candidates = [
        uid
        for uid, (modality, part) in kinds.items()
        if modality in accepts["modalities"] and (not accepts["body_parts"] or part in accepts["body_parts"])
    ]
    misses = []
    for uid in sorted(candidates, key=lambda u: -len(series[u])):
        count = len(series[uid])
        if not rules["min_slices"] <= count <= rules["max_slices"]:
            misses.append(f"series has {count} images (needs {rules['min_slices']}-{rules['max_slices']})")
            continue
        try:
            return slices_from_files(series[uid], orientation=rules["orientation"])
        except NoSuitableSeries as exc:
            misses.append(str(exc))
    raise NoSuitableSeries("; ".join(misses) or "no series the model accepts")


def metrics(outcomes: list[Outcome]) -> Metrics:
    scored = [o for o in outcomes if o.score is not None]
    tp = sum(1 for o in scored if o.label and o.flagged)
    fn = sum(1 for o in scored if o.label and not o.flagged)
    fp = sum(1 for o in scored if not o.label and o.flagged)
    tn = sum(1 for o in scored if not o.label and not o.flagged)
    return Metrics(n=len(outcomes), tp=tp, fn=fn, fp=fp, tn=tn, errors=len(outcomes) - len(scored), auc=auc(scored))


def auc(outcomes: list[Outcome]) -> float | None:
    """Area under the ROC curve: the chance a positive scores above a negative (ties count half)."""
    positives = [o.score for o in outcomes if o.label and o.score is not None]
    negatives = [o.score for o in outcomes if not o.label and o.score is not None]
    if not positives or not negatives:
        return None
    pos, neg = np.array(positives)[:, None], np.array(negatives)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def report_lines(*, model: AIModel, outcomes: list[Outcome]) -> Iterator[str]:
    """The printed report: overall figures, the confusion table, one table per condition, timing."""
    overall = metrics(outcomes)
    yield f"{model.name} {model.version}: {overall.n} studies, threshold {model.threshold:g}"
    yield ""
    yield "| | flagged | not flagged |"
    yield "|---|---|---|"
    yield f"| lesion | {overall.tp} (TP) | {overall.fn} (FN) |"
    yield f"| no lesion | {overall.fp} (FP) | {overall.tn} (TN) |"
    yield ""
    yield (
        f"Sensitivity {_fmt(overall.sensitivity)}  Specificity {_fmt(overall.specificity)}  AUC {_fmt(overall.auc)}"
        + (f"  ({overall.errors} not scored)" if overall.errors else "")
    )
    keys = [k for k in CONDITIONS if any(k in o.conditions for o in outcomes)]
    keys += sorted({k for o in outcomes for k in o.conditions} - set(keys))
    for key in keys:
        groups: dict[str, list[Outcome]] = defaultdict(list)
        for outcome in outcomes:
            groups[outcome.conditions.get(key, "")].append(outcome)
        yield ""
        yield f"| {key} | n | TP | FN | FP | TN | sensitivity | specificity |"
        yield "|---|---|---|---|---|---|---|---|"
        for value in sorted(groups, key=_natural):
            m = metrics(groups[value])
            yield (
                f"| {value or '-'} | {m.n} | {m.tp} | {m.fn} | {m.fp} | {m.tn} | {_fmt(m.sensitivity)} "
                f"| {_fmt(m.specificity)} |"
            )
    times = np.array([o.seconds for o in outcomes if o.score is not None])
    if times.size:
        yield ""
        yield (
            f"Time per study (read, preprocess, run): median {np.median(times):.2f} s, "
            f"95th percentile {np.percentile(times, 95):.2f} s, max {times.max():.2f} s"
        )
    errors = [o.error for o in outcomes if o.error]
    for error in sorted(set(errors))[:5]:
        yield f"Not scored ({errors.count(error)}): {error}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _natural(value: str) -> tuple:
    try:
        return (0, float(value.replace("σ", "").split()[0].split("-")[0]), value)
    except (ValueError, IndexError):
        return (1, 0.0, value)
