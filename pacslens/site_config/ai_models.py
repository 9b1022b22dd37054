"""The `models` section of the site YAML: registered AI models (results/inference/manifest.py).

    models:
    - name: demo-hyperdense-head-ct
      version: '2.0'
      enabled: true
      file: models/demo-hyperdense-head-ct/2.0/demo-hyperdense-head-ct-2.0.onnx  # under DATA_DIR
      sha256: ...
      ...the rest of the manifest (results/inference/manifest.py)

A model version always means one file: importing an existing name and version with another
file or manifest is refused (only `enabled` may change). Model files are not in the YAML; they
must already be at `file` (copy the models folder of the data dir along with the YAML).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings

from pacslens.site_config.checks import entries_labelled
from results.inference.manifest import manifest_normalize, manifest_problems
from results.inference.registry import model_file_problems, model_record
from results.models import AIModel


class ModelsSection:
    name = "models"

    def export(self) -> list[dict[str, Any]]:
        entries = []
        for model in AIModel.objects.order_by("name", "version"):
            manifest = {k: v for k, v in model.manifest.items() if k not in ("name", "version", "file")}
            entries.append(
                {"name": model.name, "version": model.version, "enabled": model.enabled, "file": model.file, **manifest}
            )
        return entries

    def validate(self, entries: list[Any]) -> list[str]:
        problems: list[str] = []
        versions = entries_labelled(
            self.name, entries, problems, key=lambda e: (e.get("name"), e.get("version")), what="name and version"
        )
        for label, entry in versions:
            manifest_data = {k: v for k, v in entry.items() if k != "enabled"}
            found = manifest_problems(manifest_data)
            if "enabled" in entry and not isinstance(entry["enabled"], bool):
                found["enabled"] = "must be true or false"
            if found:
                problems.extend(f"{label}: field {f!r}: {p}" for f, p in found.items())
                continue
            key = (entry["name"], entry["version"])
            manifest = manifest_normalize(manifest_data)
            existing = AIModel.objects.filter(name=key[0], version=key[1]).first()
            if existing is not None:
                if existing.manifest != _stored(manifest) or existing.file != manifest["file"]:
                    problems.append(
                        f"{label}: field 'version': this version is registered with a different file or manifest; "
                        "a version always means one file, give the changed model a new version"
                    )
                continue
            path = _data_path(manifest["file"])
            if not _under_models(path):
                problems.append(f"{label}: field 'file': must be a path under the data dir's models/ folder")
                continue
            for field, problem in model_file_problems(manifest=manifest, path=path).items():
                problems.append(f"{label}: field {field!r}: {problem}")
        return problems

    def apply(self, entries: list[dict[str, Any]], *, prune: bool) -> dict[str, int]:
        created = updated = deleted = 0
        keep = []
        for entry in entries:
            manifest = manifest_normalize({k: v for k, v in entry.items() if k != "enabled"})
            model, was_created = model_record(manifest=manifest, file=manifest["file"])
            enabled = entry.get("enabled", True)
            if model.enabled != enabled:
                AIModel.objects.filter(pk=model.pk).update(enabled=enabled)
            created += was_created
            updated += not was_created
            keep.append(model.pk)
        if prune:
            for model in AIModel.objects.exclude(pk__in=keep):
                if model.results.exists():
                    # Results name the model they came from: keep it for audit, just stop using it.
                    AIModel.objects.filter(pk=model.pk).update(enabled=False)
                    updated += 1
                else:
                    model.delete()
                    deleted += 1
        return {"created": created, "updated": updated, "deleted": deleted}


def _stored(manifest: dict[str, Any]) -> dict[str, Any]:
    return {**manifest, "file": Path(manifest["file"]).name}


def _data_path(relative: str) -> Path:
    return Path(settings.DATA_DIR) / relative


def _under_models(path: Path) -> bool:
    return path.resolve().is_relative_to((Path(settings.DATA_DIR) / "models").resolve())
