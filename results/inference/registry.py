"""Registering models: validate a manifest against its ONNX file and record an AIModel."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import onnxruntime
from django.conf import settings
from django.db import transaction

from results.inference.manifest import ManifestError, manifest_load, manifest_normalize
from results.models import AIModel


def model_register(*, manifest_path: Path) -> tuple[AIModel, bool]:
    """Validate the manifest and its file, copy the file under DATA_DIR/models/, record the model.

    Returns (model, created). Registering the same name, version and file again is a no-op;
    the same name and version with another file or manifest is refused (bump the version):
    results name the model version they came from, so a version must always mean one file.
    """
    raw = manifest_load(manifest_path)
    manifest = manifest_normalize(raw)
    source = Path(manifest["file"])
    if not source.is_absolute():
        source = manifest_path.parent / source
    problems = model_file_problems(manifest=manifest, path=source)
    if problems:
        raise ManifestError(problems)
    data_dir = Path(settings.DATA_DIR)
    target = data_dir / "models" / manifest["name"] / manifest["version"] / source.name
    if not _under(target, data_dir / "models"):  # the manifest checks make this unreachable; keep it so
        raise ManifestError({"version": "name and version must stay inside the models folder"})
    if source.resolve() != target.resolve() and not _under(source, data_dir / "models"):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    else:
        target = source
    return model_record(manifest=manifest, file=str(target.resolve().relative_to(data_dir.resolve())))


def model_record(*, manifest: dict[str, Any], file: str) -> tuple[AIModel, bool]:
    """Create the AIModel row for a validated manifest whose file is at DATA_DIR/`file`."""
    stored_manifest = {**manifest, "file": Path(file).name}
    with transaction.atomic():
        existing = AIModel.objects.filter(name=manifest["name"], version=manifest["version"]).first()
        if existing is not None:
            if existing.sha256 == manifest["sha256"] and existing.manifest == stored_manifest:
                return existing, False
            raise ManifestError(
                {
                    "version": f"{manifest['name']} {manifest['version']} is already registered with a different "
                    "file or manifest; give this one a new version"
                }
            )
        model = AIModel.objects.create(
            name=manifest["name"],
            version=manifest["version"],
            file=file,
            sha256=manifest["sha256"],
            manifest=stored_manifest,
            intended_use=manifest["intended_use"],
            demonstration=manifest["demonstration"],
        )
    return model, True


def model_file_problems(*, manifest: dict[str, Any], path: Path) -> dict[str, str]:
    """Check the file exists, has the manifest's sha256, and has the input and output it names."""
    if not path.is_file():
        return {"file": f"{path} does not exist or is not a file"}
    digest = file_sha256(path)
    if digest != manifest["sha256"]:
        return {"sha256": f"the file's SHA-256 is {digest}, the manifest says {manifest['sha256']}"}
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        return {"file": f"onnxruntime cannot load it: {str(exc)[:300]}"}
    problems: dict[str, str] = {}
    inputs = {i.name: i for i in session.get_inputs()}
    wanted = manifest["input"]
    if wanted["name"] not in inputs:
        problems["input.name"] = f"the model has no input {wanted['name']!r} (it has {', '.join(inputs)})"
    else:
        declared = inputs[wanted["name"]]
        if declared.type != "tensor(float)":
            problems["input.name"] = f"input {wanted['name']!r} is {declared.type}; PacsLens feeds float32"
        dims = declared.shape
        if len(dims) != len(wanted["shape"]) or any(
            isinstance(d, int) and d != w for d, w in zip(dims, wanted["shape"], strict=False)
        ):
            problems["input.shape"] = f"the model's input shape is {dims}, the manifest says {wanted['shape']}"
    if len(inputs) != 1:
        problems.setdefault("input.name", f"the model has {len(inputs)} inputs; PacsLens feeds exactly one")
    outputs = [o.name for o in session.get_outputs()]
    if manifest["output"]["score"] not in outputs:
        problems["output.score"] = (
            f"the model has no output {manifest['output']['score']!r} (it has {', '.join(outputs)})"
        )
    return problems


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _under(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False
