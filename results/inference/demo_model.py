"""The demonstration model: hyperdense-region triage for head CT, built from code. NOT FOR CLINICAL USE.

No weights, nothing downloaded: the ONNX graph is a few transparent operations on a volume
in Hounsfield units, so anyone can read exactly why a study scored what it did:

    bone      = volume > 150 HU
    near_bone = 5x5 in-plane max-pool of bone        (drops partial-volume voxels at the skull)
    region    = 0 <= volume <= 90 HU, not near bone   (soft tissue: the brain, roughly)
    dense     = 55 <= volume <= 90 HU, not near bone  (the density of acute blood)
    fraction  = sum(dense) / max(sum(region), 1)
    score     = sigmoid(SLOPE * (fraction - MIDPOINT))

It exists so the README tour, the tests and the benchmarks run offline end to end. It knows
nothing about real anatomy, artefacts or calcifications.
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
from routing.models import Operator, RoutingRule

NAME = "demo-hyperdense-head-ct"
VERSION = "1.0"
INPUT_SHAPE = [1, 1, 48, 128, 128]
BONE_HU = 150.0
REGION_HU = (0.0, 90.0)
DENSE_HU = (55.0, 90.0)
MIDPOINT = 0.0008  # 0.08 % of the region: a lesion of ~1 cm radius in an adult brain
SLOPE = 4000.0
THRESHOLD = 0.5
INTENDED_USE = (
    "DEMONSTRATION ONLY, NOT FOR CLINICAL USE. Built by PacsLens from code to exercise the pipeline "
    "on synthetic studies (make_demo_study): scores the fraction of soft-tissue voxels at acute-blood "
    "density (55-90 HU) in an axial head CT. It has not been validated on any patient data."
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
        "series": {"orientation": "axial", "min_slices": 8, "max_slices": 2000, "choose": "most_slices"},
        "input": {
            "name": "volume",
            "shape": list(INPUT_SHAPE),
            "rescale": "hu",
            "window": None,
            # Nearest keeps the phantom's sharp edges sharp; averaging would invent voxels at
            # blood density where brain meets bone.
            "resize": "nearest",
            "slices": "nearest",
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

    def between(prefix: str, low: str, high: str) -> list[onnx.NodeProto]:
        return [
            helper.make_node("GreaterOrEqual", ["volume", low], [f"{prefix}_ge"]),
            helper.make_node("LessOrEqual", ["volume", high], [f"{prefix}_le"]),
            helper.make_node("And", [f"{prefix}_ge", f"{prefix}_le"], [f"{prefix}_in"]),
            helper.make_node("Cast", [f"{prefix}_in"], [f"{prefix}_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{prefix}_f", "away_from_bone"], [f"{prefix}_mask"]),
            helper.make_node("ReduceSum", [f"{prefix}_mask"], [f"{prefix}_voxels"], keepdims=0),
        ]

    nodes = [
        helper.make_node("Greater", ["volume", "bone_hu"], ["bone"]),
        helper.make_node("Cast", ["bone"], ["bone_f"], to=TensorProto.FLOAT),
        helper.make_node("MaxPool", ["bone_f"], ["near_bone"], kernel_shape=[1, 5, 5], pads=[0, 2, 2, 0, 2, 2]),
        helper.make_node("Sub", ["one", "near_bone"], ["away_from_bone"]),
        *between("region", "region_low", "region_high"),
        *between("dense", "dense_low", "dense_high"),
        helper.make_node("Max", ["region_voxels", "one"], ["region_safe"]),
        helper.make_node("Div", ["dense_voxels", "region_safe"], ["fraction"]),
        helper.make_node("Sub", ["fraction", "midpoint"], ["centred"]),
        helper.make_node("Mul", ["centred", "slope"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["score_scalar"]),
        helper.make_node("Reshape", ["score_scalar", "shape_1"], ["score"]),
        helper.make_node("Reshape", ["fraction", "shape_1"], ["hyperdense_fraction"]),
    ]
    initializers = [
        const("bone_hu", BONE_HU),
        const("one", 1.0),
        const("region_low", REGION_HU[0]),
        const("region_high", REGION_HU[1]),
        const("dense_low", DENSE_HU[0]),
        const("dense_high", DENSE_HU[1]),
        const("midpoint", MIDPOINT),
        const("slope", SLOPE),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "shape_1"),
    ]
    graph = helper.make_graph(
        nodes,
        "demo_hyperdense_head_ct",
        [helper.make_tensor_value_info("volume", TensorProto.FLOAT, INPUT_SHAPE)],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("hyperdense_fraction", TensorProto.FLOAT, [1]),
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

    Called by setup_site (so by `make run`): idempotent, returns one line to print.
    """
    manifest_path, _ = demo_model_write(directory=Path(settings.DATA_DIR) / "models" / "demo")
    model, created = model_register(manifest_path=manifest_path)
    line = f"Demonstration model {model.name} {model.version} {'registered' if created else 'ready'} (not for clinical use)"
    with transaction.atomic():
        if RoutingRule.objects.exists():
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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
