"""The demonstration model: hyperdense-region triage for head CT, built from code. NOT FOR CLINICAL USE.

No weights, nothing downloaded: the ONNX graph is a few transparent operations on a volume
in Hounsfield units that preprocessing has resampled to 2 mm voxels (the manifest's `spacing`:
box means from each series' Pixel Spacing and slice positions, so thin noisy slices average
out and every kernel below has a fixed size in millimetres). Anyone can read why a study
scored what it did:

    hot       = volume > 120 HU                 bone and calcification (blood is at most 90 HU)
    near_hot  = max-pool of hot, 7x7x7 voxels   the 6 mm around them: the skull's partial-volume
                                                rim, the beam-hardening band inside it, the halo
                                                of a calcification
    smooth    = 3x3x3 mean (6 mm) of the volume clipped at 100 HU, hot voxels counted as brain
    dense     = smooth >= 42 HU and not near_hot        (brain is 25-40 HU, acute blood 50-90)
    core      = opening of dense by a 2x2x2 block (min-pool, then max-pool): only whole
                4 mm cubes of dense tissue are left; noise specks and thin bands vanish
    largest   = the most core volume inside any 14 mm cube (separable 7x7x7 mean, max)
    score     = sigmoid(SLOPE * (largest_ml - MIN_ML))    flagged from 0.5: 0.08 mL of core
    outputs   : score, hyperdense_volume_ml (all core), largest_region_ml

Version 1.0 thresholded single voxels and flagged clean studies with ordinary scanner noise;
results made by it still name it (a version always means one file; setup_site registers 2.0
beside it and moves its own demo rule). docs/demo-model.md has the evaluation (manage.py
evaluate_model) and what the model cannot see: blood within ~5 mm of the skull (subdural,
epidural) is excluded with the bone, and a calcification wider than about 5 mm on thick slices
can look like a small bleed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import yaml
from django.conf import settings
from django.db import transaction
from onnx import TensorProto, helper, numpy_helper

from results.inference.registry import model_register
from results.models import AIModel
from routing.models import Operator, RoutingRule

NAME = "demo-hyperdense-head-ct"
VERSION = "2.0"
INPUT_SHAPE = [1, 1, 90, 128, 128]  # 180 x 256 x 256 mm
SPACING_MM = [2.0, 2.0, 2.0]  # z, y, x
HOT_HU = 120.0  # bone and calcification; blood is at most 90 HU
NEAR_HOT_KERNEL = [7, 7, 7]  # voxels: 6 mm around bone and calcification
CLIP_HU = 100.0
HOT_FILL = 38.0  # what bone and calcified voxels count as in the mean: brain
SMOOTH_KERNEL = [3, 3, 3]  # 6 x 6 x 6 mm
DENSE_HU = 42.0
OPENING_KERNEL = [2, 2, 2]  # 4 x 4 x 4 mm
REGION_KERNEL = 7  # a 14 mm cube: holds most of a 0.5-1 mL bleed, not two foci 2 cm apart
MIN_ML = 0.08
SLOPE = 60.0  # per mL: the score is 0.01 with no dense core at all, 0.5 at MIN_ML, 0.72 at MIN_ML + 0.016 mL (2 voxels)
THRESHOLD = 0.5
INTENDED_USE = (
    "DEMONSTRATION ONLY, NOT FOR CLINICAL USE. Built by PacsLens from code to exercise the pipeline "
    "on synthetic studies (make_demo_study): flags an axial head CT holding a compact region at "
    "acute-blood density (46-100 HU after 3-D smoothing) of at least 0.2 mL away from bone and "
    "calcification. It has not been validated on any patient data."
)
RULE_NAME = "Demo: CT head to the demonstration model"


def demo_manifest(*, file: str, sha256: str) -> dict:
    return {
        "name": NAME,
        "version": VERSION,
        "file": file,
        "sha256": sha256,
        "intended_use": INTENDED_USE,
        "demonstration": True,
        "accepts": {"modalities": ["CT"], "body_parts": ["HEAD", "BRAIN"]},
        "series": {"orientation": "axial", "min_slices": 1, "max_slices": 2000, "choose": "most_slices"},
        "input": {
            "name": "volume",
            "shape": list(INPUT_SHAPE),
            "rescale": "hu",
            "window": None,
            # Resampled to a physical grid: box means, so thin noisy slices average out.
            "resize": "linear",
            "slices": "mean",
            "spacing": list(SPACING_MM),
        },
        "output": {
            "score": "score",
            "threshold": THRESHOLD,
            "labels": {"positive": "hyperdense region", "negative": "no hyperdense region"},
        },
    }


def demo_model_build() -> onnx.ModelProto:
    def const(name: str, value: float) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(value, dtype=np.float32), name)

    def pool(op: str, source: str, target: str, kernel: list[int], *, reflect: bool = False, **attributes):
        # Padded so the output has the input's shape (MaxPool ignores the padding, AveragePool
        # leaves it out of the count). An even kernel has one more pad after than before;
        # `reflect` swaps that, so an erosion and the dilation after it cover the same voxels.
        before, after = [(k - 1) // 2 for k in kernel], [k // 2 for k in kernel]
        if reflect:
            before, after = after, before
        return helper.make_node(op, [source], [target], kernel_shape=kernel, pads=before + after, **attributes)

    voxel_ml = float(np.prod(SPACING_MM)) / 1000
    nodes = [
        helper.make_node("Greater", ["volume", "hot_hu"], ["hot"]),
        helper.make_node("Cast", ["hot"], ["hot_f"], to=TensorProto.FLOAT),
        pool("MaxPool", "hot_f", "near_hot", NEAR_HOT_KERNEL),
        helper.make_node("Sub", ["one", "near_hot"], ["away_from_hot"]),
        # Clipped first: a small bright focus (a calcification) weighs no more than blood would.
        helper.make_node("Min", ["volume", "clip_hu"], ["clipped_raw"]),
        # Bone and calcified voxels count as water in the mean: they neither lift the brain
        # next to them into the blood range nor hide a bleed beside them.
        helper.make_node("Where", ["hot", "hot_fill", "clipped_raw"], ["clipped"]),
        pool("AveragePool", "clipped", "smooth", SMOOTH_KERNEL, count_include_pad=0),
        helper.make_node("GreaterOrEqual", ["smooth", "dense_hu"], ["dense_in"]),
        helper.make_node("Cast", ["dense_in"], ["dense_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["dense_f", "away_from_hot"], ["dense"]),
        # Opening: erosion (a min-pool, as 1 - max-pool of the complement), then dilation.
        helper.make_node("Sub", ["one", "dense"], ["not_dense"]),
        pool("MaxPool", "not_dense", "not_eroded", OPENING_KERNEL),
        helper.make_node("Sub", ["one", "not_eroded"], ["eroded"]),
        pool("MaxPool", "eroded", "core", OPENING_KERNEL, reflect=True),
        helper.make_node("ReduceSum", ["core"], ["core_voxels"], keepdims=0),
        helper.make_node("Mul", ["core_voxels", "voxel_ml"], ["volume_ml"]),
        # The score looks at the largest compact region, not the sum: the core volume inside
        # the best-placed cube of REGION_KERNEL (a separable mean, then the maximum), so a
        # few small foci far apart do not add up to one bleed.
        pool("AveragePool", "core", "region_z", [REGION_KERNEL, 1, 1], count_include_pad=1),
        pool("AveragePool", "region_z", "region_zy", [1, REGION_KERNEL, 1], count_include_pad=1),
        pool("AveragePool", "region_zy", "region", [1, 1, REGION_KERNEL], count_include_pad=1),
        helper.make_node("ReduceMax", ["region"], ["region_share"], keepdims=0),
        helper.make_node("Mul", ["region_share", "region_ml"], ["largest_ml"]),
        helper.make_node("Sub", ["largest_ml", "min_ml"], ["centred"]),
        helper.make_node("Mul", ["centred", "slope"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["score_scalar"]),
        helper.make_node("Reshape", ["score_scalar", "shape_1"], ["score"]),
        helper.make_node("Reshape", ["volume_ml", "shape_1"], ["hyperdense_volume_ml"]),
        helper.make_node("Reshape", ["largest_ml", "shape_1"], ["largest_region_ml"]),
    ]
    initializers = [
        const("hot_hu", HOT_HU),
        const("one", 1.0),
        const("clip_hu", CLIP_HU),
        const("hot_fill", HOT_FILL),
        const("dense_hu", DENSE_HU),
        const("voxel_ml", voxel_ml),
        const("region_ml", voxel_ml * REGION_KERNEL**3),
        const("min_ml", MIN_ML),
        const("slope", SLOPE),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "shape_1"),
    ]
    graph = helper.make_graph(
        nodes,
        "demo_hyperdense_head_ct",
        [helper.make_tensor_value_info("volume", TensorProto.FLOAT, INPUT_SHAPE)],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("hyperdense_volume_ml", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("largest_region_ml", TensorProto.FLOAT, [1]),
        ],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="pacslens",
        doc_string="PacsLens demonstration model: NOT FOR CLINICAL USE. " + INTENDED_USE,
    )
    model.ir_version = 8  # readable by every onnxruntime release of the last few years
    onnx.checker.check_model(model, full_check=True)
    return model


def demo_model_write(*, directory: Path) -> tuple[Path, dict]:
    """Write the ONNX file and its manifest (YAML) into `directory`; returns (manifest path, manifest)."""
    directory.mkdir(parents=True, exist_ok=True)
    onnx_name = f"{NAME}-{VERSION}.onnx"
    data = demo_model_build().SerializeToString()
    _write_atomic(directory / onnx_name, data)
    manifest = demo_manifest(file=onnx_name, sha256=hashlib.sha256(data).hexdigest())
    manifest_path = directory / f"{NAME}-{VERSION}.yaml"
    _write_atomic(manifest_path, yaml.safe_dump(manifest, sort_keys=False).encode())
    return manifest_path, manifest


def ensure_demo_setup() -> str:
    """Build and register the demo model, and add the demo rule when the site has no rules.

    Called by setup_site (so by `make run`): idempotent, returns one line to print. On a site
    set up with an earlier version, the demo rule moves to this version; the earlier version
    stays registered, so the results it made still name the file that made them.
    """
    manifest_path, _ = demo_model_write(directory=Path(settings.DATA_DIR) / "models" / "demo")
    model, created = model_register(manifest_path=manifest_path)
    line = f"Demonstration model {model.name} {model.version} {'registered' if created else 'ready'} (not for clinical use)"
    with transaction.atomic():
        if RoutingRule.objects.exists():
            upgraded = _demo_rule_upgrade(model)
            if upgraded:
                return line + f"; routing rule {RULE_NAME!r} now runs it instead of {', '.join(upgraded)}"
            return line + "; routing rules exist, demo rule not added"
        rule = RoutingRule.objects.create(
            name=RULE_NAME,
            description="Added by setup_site because the site had no rules. Demonstration, not for clinical use.",
            position=1000,
        )
        rule.conditions.create(attribute="Modality", operator=Operator.EQUALS, value="CT", position=0)
        rule.conditions.create(attribute="BodyPartExamined", operator=Operator.ONE_OF, value="HEAD\\BRAIN", position=1)
        rule.ai_models.add(model)
    return line + f"; routing rule {rule.name!r} added"


def _demo_rule_upgrade(model: AIModel) -> list[str]:
    """Point setup_site's own demo rule from earlier demo versions to `model`; the versions replaced."""
    rule = RoutingRule.objects.filter(name=RULE_NAME).first()
    if rule is None:
        return []
    older = [m for m in rule.ai_models.filter(name=NAME, demonstration=True) if m.pk != model.pk]
    if not older:
        return []
    rule.ai_models.remove(*older)
    rule.ai_models.add(model)
    return [m.version for m in older]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
