"""The `routing_rules` section of the site YAML (after `models`, which the rules name).

routing_rules:
- name: CT head
  enabled: true
  position: 10
  priority: stat            # stat | routine
  stop_at_first_match: true
  models: [{name: demo-hyperdense-head-ct, version: '2.0'}]
  shadow: false             # true: run the models, record the results, deliver nothing
  shadow_models: [{name: demo-hyperdense-head-ct, version: '2.1'}]   # run beside, never delivered
  conditions:
  - {attribute: Modality, operator: equals, value: CT}
  - {attribute: BodyPartExamined, operator: one_of, value: [HEAD, BRAIN]}
  - {attribute: ContrastBolusAgent, operator: absent}
"""

from __future__ import annotations

from typing import Any

from pacslens.site_config.checks import entries_labelled
from results.models import AIModel
from routing.models import Priority, RoutingRule
from routing.models.rules import (
    ONE_OF_SEPARATOR,
    VALUELESS_OPERATORS,
    Operator,
    condition_problems,
)

PRIORITIES = {"stat": Priority.STAT, "routine": Priority.ROUTINE}
RULE_FIELDS = [
    "name",
    "description",
    "enabled",
    "position",
    "priority",
    "stop_at_first_match",
    "models",
    "shadow",
    "shadow_models",
    "conditions",
]


class RoutingRulesSection:
    name = "routing_rules"
    # validate() looks at the `models` section of the same file: rules may name models it adds.
    needs_document = True

    def export(self) -> list[dict[str, Any]]:
        entries = []
        for rule in RoutingRule.objects.prefetch_related("conditions", "ai_models", "shadow_ai_models").order_by(
            "position", "id"
        ):
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
                    "shadow": rule.shadow,
                    "shadow_models": [
                        {"name": m.name, "version": m.version}
                        for m in rule.shadow_ai_models.order_by("name", "version")
                    ],
                    # Destinations join here (`destinations: [...]`) with the delivery issue.
                    "conditions": [_condition_export(c) for c in rule.conditions.all()],
                }
            )
        return entries

    def validate(self, entries: list[Any], *, document: dict[str, Any] | None = None) -> list[str]:
        known_models: set[tuple[Any, Any]] = set(AIModel.objects.values_list("name", "version"))
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
                    "shadow": entry.get("shadow", False),
                },
            )
            rule.conditions.all().delete()
            for position, condition in enumerate(entry.get("conditions") or []):
                rule.conditions.create(position=position, **_condition_fields(condition))
            for relation, key in ((rule.ai_models, "models"), (rule.shadow_ai_models, "shadow_models")):
                relation.set([AIModel.objects.get(name=m["name"], version=m["version"]) for m in entry.get(key) or []])
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
    for flag in ("enabled", "stop_at_first_match", "shadow"):
        if not isinstance(entry.get(flag, True), bool):
            problems.append(f"field {flag!r}: must be true or false")
    position = entry.get("position", 100)
    if not isinstance(position, int) or isinstance(position, bool) or position < 0:
        problems.append("field 'position': must be a whole number of at least 0")
    if entry.get("priority", "routine") not in PRIORITIES:
        problems.append("field 'priority': must be stat or routine")
    named: dict[str, set[tuple[Any, Any]]] = {}
    for key in ("models", "shadow_models"):
        models = entry.get(key) or []
        if not isinstance(models, list):
            problems.append(f"field {key!r}: must be a list of {{name, version}}")
            models = []
        named[key] = set()
        for i, model in enumerate(models):
            if not isinstance(model, dict) or set(model) != {"name", "version"}:
                problems.append(f"field '{key}[{i}]': must be {{name: ..., version: ...}}")
            elif (model["name"], model["version"]) not in known_models:
                problems.append(
                    f"field '{key}[{i}]': no model {model['name']} {model['version']} is registered or in this file"
                )
            else:
                named[key].add((model["name"], model["version"]))
    for name_version in sorted(named["models"] & named["shadow_models"]):
        problems.append(f"field 'shadow_models': {name_version[0]} {name_version[1]} is also in 'models' (live)")
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
