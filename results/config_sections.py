"""The `models` and `routing_rules` sections of the site YAML (export_config / import_config).

    models:
    - name: demo-hyperdense-head-ct
      version: '1.0'
      enabled: true
      file: models/demo-hyperdense-head-ct/1.0/demo-hyperdense-head-ct-1.0.onnx  # under DATA_DIR
      sha256: ...
      ...the rest of the manifest (results/manifest.py)
    routing_rules:
    - name: CT head
      enabled: true
      position: 10
      priority: stat            # stat | routine
      stop_at_first_match: true
      models: [{name: demo-hyperdense-head-ct, version: '1.0'}]
      conditions:
      - {attribute: Modality, operator: equals, value: CT}
      - {attribute: BodyPartExamined, operator: one_of, value: [HEAD, BRAIN]}
      - {attribute: ContrastBolusAgent, operator: absent}

A model version always means one file: importing an existing name and version with another
file or manifest is refused (only `enabled` may change). Model files are not in the YAML; they
must already be at `file` (copy the models folder of the data dir along with the YAML).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings

from results.manifest import manifest_normalize, manifest_problems
from results.models import AIModel
from results.registry import model_file_problems, model_record
from routing.config_checks import entries_labelled
from routing.models import Priority, RoutingRule
from routing.models.rules import (
    ONE_OF_SEPARATOR,
    VALUELESS_OPERATORS,
    Operator,
    condition_problems,
)

PRIORITIES = {"stat": Priority.STAT, "routine": Priority.ROUTINE}
RULE_FIELDS = ["name", "description", "enabled", "position", "priority", "stop_at_first_match", "models", "conditions"]


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


class RoutingRulesSection:
    name = "routing_rules"
    # validate() looks at the `models` section of the same file: rules may name models it adds.
    needs_document = True

    def export(self) -> list[dict[str, Any]]:
        entries = []
        for rule in RoutingRule.objects.prefetch_related("conditions", "ai_models").order_by("position", "id"):
            entries.append(
                {
                    "name": rule.name,
                    "description": rule.description,
                    "enabled": rule.enabled,
                    "position": rule.position,
                    "priority": "stat" if rule.priority == Priority.STAT else "routine",
                    "stop_at_first_match": rule.stop_at_first_match,
                    "models": [
                        {"name": m.name, "version": m.version} for m in rule.ai_models.order_by("name", "version")
                    ],
                    # Destinations join here (`destinations: [...]`) with the delivery issue.
                    "conditions": [_condition_export(c) for c in rule.conditions.all()],
                }
            )
        return entries

    def validate(self, entries: list[Any], *, document: dict[str, Any] | None = None) -> list[str]:
        known_models = set(AIModel.objects.values_list("name", "version"))
        for entry in (document or {}).get("models") or []:
            if isinstance(entry, dict):
                known_models.add((entry.get("name"), entry.get("version")))
        problems: list[str] = []
        for label, entry in entries_labelled(self.name, entries, problems, key=lambda e: e.get("name")):
            problems.extend(f"{label}: {p}" for p in _rule_problems(entry, known_models))
        return problems

    def apply(self, entries: list[dict[str, Any]], *, prune: bool) -> dict[str, int]:
        created = updated = 0
        for entry in entries:
            rule, was_created = RoutingRule.objects.update_or_create(
                name=entry["name"],
                defaults={
                    "description": entry.get("description", ""),
                    "enabled": entry.get("enabled", True),
                    "position": entry.get("position", 100),
                    "priority": PRIORITIES[entry.get("priority", "routine")],
                    "stop_at_first_match": entry.get("stop_at_first_match", True),
                },
            )
            rule.conditions.all().delete()
            for position, condition in enumerate(entry.get("conditions") or []):
                rule.conditions.create(position=position, **_condition_fields(condition))
            rule.ai_models.set(
                [AIModel.objects.get(name=m["name"], version=m["version"]) for m in entry.get("models") or []]
            )
            created += was_created
            updated += not was_created
        deleted = 0
        if prune:
            deleted, _ = RoutingRule.objects.exclude(name__in=[e["name"] for e in entries]).delete()
        return {"created": created, "updated": updated, "deleted": deleted}


def _rule_problems(entry: dict[str, Any], known_models: set[tuple[Any, Any]]) -> list[str]:
    problems = []
    unknown = sorted(set(entry) - set(RULE_FIELDS))
    if unknown:
        problems.append(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(RULE_FIELDS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 100:
        problems.append("field 'name': required, at most 100 characters")
    if not isinstance(entry.get("description", ""), str):
        problems.append("field 'description': must be text")
    for flag in ("enabled", "stop_at_first_match"):
        if not isinstance(entry.get(flag, True), bool):
            problems.append(f"field {flag!r}: must be true or false")
    position = entry.get("position", 100)
    if not isinstance(position, int) or isinstance(position, bool) or position < 0:
        problems.append("field 'position': must be a whole number of at least 0")
    if entry.get("priority", "routine") not in PRIORITIES:
        problems.append("field 'priority': must be stat or routine")
    models = entry.get("models") or []
    if not isinstance(models, list):
        problems.append("field 'models': must be a list of {name, version}")
        models = []
    for i, model in enumerate(models):
        if not isinstance(model, dict) or set(model) != {"name", "version"}:
            problems.append(f"field 'models[{i}]': must be {{name: ..., version: ...}}")
        elif (model["name"], model["version"]) not in known_models:
            problems.append(
                f"field 'models[{i}]': no model {model['name']} {model['version']} is registered or in this file"
            )
    conditions = entry.get("conditions") or []
    if not isinstance(conditions, list):
        return problems + ["field 'conditions': must be a list"]
    for i, condition in enumerate(conditions):
        where = f"field 'conditions[{i}]"
        if not isinstance(condition, dict) or not set(condition) <= {"attribute", "operator", "value"}:
            problems.append(f"{where}': must be {{attribute, operator, value}}")
            continue
        value = condition.get("value", "")
        if isinstance(value, list):
            if condition.get("operator") != Operator.ONE_OF:
                problems.append(f"{where}.value': a list is only allowed with one_of")
                continue
            if not all(isinstance(v, str) and ONE_OF_SEPARATOR not in v for v in value):
                problems.append(f"{where}.value': one_of values are texts without a backslash")
                continue
        elif not isinstance(value, str):
            problems.append(f"{where}.value': must be text (quote numbers)")
            continue
        fields = _condition_fields(condition)
        for field, problem in condition_problems(**fields).items():
            problems.append(f"{where}.{field}': {problem}")
    return problems


def _condition_export(condition) -> dict[str, Any]:
    entry: dict[str, Any] = {"attribute": condition.attribute, "operator": condition.operator}
    if condition.operator == Operator.ONE_OF:
        entry["value"] = condition.options
    elif condition.operator not in VALUELESS_OPERATORS:
        entry["value"] = condition.value
    return entry


def _condition_fields(condition: dict[str, Any]) -> dict[str, str]:
    value = condition.get("value", "")
    if isinstance(value, list):
        value = ONE_OF_SEPARATOR.join(value)
    return {"attribute": condition.get("attribute", ""), "operator": condition.get("operator", ""), "value": value}


def _stored(manifest: dict[str, Any]) -> dict[str, Any]:
    return {**manifest, "file": Path(manifest["file"]).name}


def _data_path(relative: str) -> Path:
    return Path(settings.DATA_DIR) / relative


def _under_models(path: Path) -> bool:
    return path.resolve().is_relative_to((Path(settings.DATA_DIR) / "models").resolve())


SECTIONS = [ModelsSection(), RoutingRulesSection()]
