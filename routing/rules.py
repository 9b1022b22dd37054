"""Matching studies against routing rules, explaining the verdict, and routing a complete study.

A rule matches a study when one series satisfies all its conditions (study-level attributes such
as the calling AE are shared by every series). Evaluating per series keeps "CT and HEAD" from
matching a study that has a CT chest series and an MR head series.

Comparison is case-insensitive and ignores DICOM's space padding; multi-valued attributes
(ImageType ORIGINAL\\PRIMARY\\AXIAL) hold when any one value does. `regex` is an RE2
search (linear time: routing/models/rules.py rule_regex), so anchor with ^ and $ for a
whole-value match. Nothing here evaluates user text as code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import pydicom
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from pydicom.datadict import tag_for_keyword

from routing.models import (
    Instance,
    Operator,
    Priority,
    RoutingDecision,
    RoutingRule,
    RuleCondition,
    Series,
    Study,
    StudyState,
)
from routing.models.rules import CALLED_AE, CALLING_AE, rule_regex

logger = logging.getLogger(__name__)


@dataclass
class ConditionVerdict:
    condition: RuleCondition
    seen: list[str]
    holds: bool

    def describe(self) -> str:
        """For the timeline and support output: patient attributes are never spelled out there."""
        if self.seen and _is_patient_attribute(self.condition.attribute):
            seen = "a value (patient data, not shown)"
        else:
            seen = ", ".join(repr(v) for v in self.seen) if self.seen else "nothing"
        return f"{self.condition}: {'yes' if self.holds else 'no'} (saw {seen})"


@dataclass
class RuleVerdict:
    rule: RoutingRule
    matched: bool
    # The series the verdicts below were taken on: the matching one, else the closest miss.
    series_instance_uid: str | None
    conditions: list[ConditionVerdict]
    # Why the rule does not count even if it matched: "disabled", "after a stopping rule".
    skipped: str = ""

    @property
    def counts(self) -> bool:
        return self.matched and not self.skipped


@dataclass
class RoutingExplanation:
    study: Study
    verdicts: list[RuleVerdict] = field(default_factory=list)

    @property
    def matched_rules(self) -> list[RoutingRule]:
        return [v.rule for v in self.verdicts if v.counts]

    @property
    def priority(self) -> int:
        # Never demote: a study already marked STAT at ingest stays STAT.
        return min([self.study.priority] + [rule.priority for rule in self.matched_rules])

    @property
    def reason(self) -> str:
        matched = self.matched_rules
        if matched:
            return "matched " + ", ".join(f"rule {r.name!r}" for r in matched)
        enabled = [v for v in self.verdicts if v.skipped != "disabled"]
        if not enabled:
            return "no rule matched: there are no enabled routing rules"
        misses = []
        for verdict in enabled:
            failed = [c.describe() for c in verdict.conditions if not c.holds]
            misses.append(f"rule {verdict.rule.name!r}: " + ("; ".join(failed) or "no series"))
        return "no rule matched: " + " | ".join(misses)


def study_explain_routing(*, study: Study) -> RoutingExplanation:
    """Every rule (enabled or not) with each condition's verdict and the value it saw: a dry run."""
    context = StudyContext(study)
    explanation = RoutingExplanation(study=study)
    stopped_by: RoutingRule | None = None
    rules = RoutingRule.objects.prefetch_related("conditions", "ai_models", "shadow_ai_models").order_by(
        "position", "id"
    )
    for rule in rules:
        verdict = rule_evaluate(rule=rule, context=context)
        if not rule.enabled:
            verdict.skipped = "disabled"
        elif stopped_by is not None:
            verdict.skipped = f"not reached: rule {stopped_by.name!r} matched and stops matching"
        elif verdict.matched and rule.stop_at_first_match:
            stopped_by = rule
        explanation.verdicts.append(verdict)
    return explanation


def study_route(*, study: Study) -> RoutingDecision | None:
    """Route a COMPLETE study: ROUTED with its models and priority, or IGNORED with the reason.

    Returns None when another worker routed it first (the state compare-and-set failed).
    """
    explanation = study_explain_routing(study=study)
    rules = explanation.matched_rules
    models, shadow = rules_models(rules)
    reason = explanation.reason
    if rules and not models:
        # A matching rule without an enabled model is configuration in progress, not work.
        reason += "; but none of their models is enabled"
    to_state = StudyState.ROUTED if models else StudyState.IGNORED
    priority = explanation.priority
    with transaction.atomic():
        if models and priority != study.priority:
            Study.objects.filter(pk=study.pk, state=StudyState.COMPLETE).update(priority=priority)
        if not study.transition(to_state, from_states=[StudyState.COMPLETE], detail=reason):
            transaction.set_rollback(True)
            return None
        decision = RoutingDecision.objects.create(
            study=study,
            matched_rules=[{"id": r.pk, "name": r.name} for r in rules],
            priority=priority,
            reason=reason,
        )
        decision.ai_models.set(models.values())
        decision.shadow_ai_models.set([models[pk] for pk in shadow])
    if models:
        study.priority = priority
    logger.info("study %s %s: %s", study.pk, to_state, ", ".join(r.name for r in rules) or "no rule")
    return decision


def rules_models(rules: list[RoutingRule]) -> tuple[dict[int, Any], set[int]]:
    """The enabled models the matched `rules` run, by id, and which of them run in shadow: a
    model is shadow when no matched rule runs it live (a shadow rule, or its shadow models)."""
    models: dict[int, Any] = {}
    live: set[int] = set()
    for rule in rules:
        for model in rule.ai_models.all():
            if model.enabled:
                models[model.pk] = model
                if not rule.shadow:
                    live.add(model.pk)
        for model in rule.shadow_ai_models.all():
            if model.enabled:
                models[model.pk] = model
    return models, set(models) - live


def studies_route_lost(*, idle: timedelta) -> int:
    """Route COMPLETE studies whose routing task was lost (worker killed, broker row lost):
    complete for longer than `idle`. Returns how many were routed."""
    cutoff = timezone.now() - idle
    stuck = Study.objects.filter(state=StudyState.COMPLETE, completed_at__lt=cutoff)
    return sum(study_route(study=study) is not None for study in stuck)


def rule_evaluate(*, rule: RoutingRule, context: StudyContext) -> RuleVerdict:
    conditions = list(rule.conditions.all())
    best: RuleVerdict | None = None
    candidates: list[Series | None] = [*context.series] or [None]
    for series in candidates:
        verdicts = [condition_evaluate(condition=c, seen=context.values(c.attribute, series)) for c in conditions]
        uid = series.series_instance_uid if series else None
        verdict = RuleVerdict(
            rule=rule, matched=all(v.holds for v in verdicts), series_instance_uid=uid, conditions=verdicts
        )
        if verdict.matched:
            return verdict
        if best is None or sum(v.holds for v in verdicts) > sum(v.holds for v in best.conditions):
            best = verdict
    assert best is not None
    return best


def condition_evaluate(*, condition: RuleCondition, seen: list[str]) -> ConditionVerdict:
    present = [v for v in seen if v]
    operator = condition.operator
    wanted = condition.value.strip().casefold()
    if operator == Operator.PRESENT:
        holds = bool(present)
    elif operator == Operator.ABSENT:
        holds = not present
    elif operator == Operator.EQUALS:
        holds = any(v.casefold() == wanted for v in present)
    elif operator == Operator.ONE_OF:
        options = {o.casefold() for o in condition.options}
        holds = any(v.casefold() in options for v in present)
    elif operator == Operator.CONTAINS:
        holds = any(wanted in v.casefold() for v in present)
    elif operator == Operator.REGEX:
        try:
            pattern = rule_regex(condition.value)
        except ValueError:  # saved before RE2 was required: refused now, it never matches
            logger.warning("routing: condition %s has a regex RE2 cannot run; it does not match", condition.pk)
            holds = False
        else:
            holds = any(pattern.search(v) for v in present)
    else:  # unreachable: operators are validated on save
        raise ValueError(f"unknown operator {operator!r}")
    return ConditionVerdict(condition=condition, seen=seen, holds=holds)


class StudyContext:
    """The values rules see, read lazily: database columns first, file headers only when asked."""

    def __init__(self, study: Study) -> None:
        self.study = study
        self._headers: dict[int, pydicom.Dataset | None] = {}

    @cached_property
    def series(self) -> list[Series]:
        return list(self.study.series.order_by("series_number", "id"))

    @cached_property
    def _sop_classes(self) -> dict[int, list[str]]:
        classes: dict[int, set[str]] = {}
        for series_id, sop_class in Instance.objects.filter(study=self.study).values_list("series_id", "sop_class_uid"):
            classes.setdefault(series_id, set()).add(sop_class)
        return {k: sorted(v) for k, v in classes.items()}

    def values(self, attribute: str, series: Series | None) -> list[str]:
        study = self.study
        if attribute == CALLING_AE:
            return _clean([study.calling_ae_title])
        if attribute == CALLED_AE:
            return _clean([study.called_ae_title])
        if attribute == "StudyDescription":
            return _clean([study.study_description])
        if series is None:
            return []
        if attribute == "Modality":
            return _clean([series.modality])
        if attribute == "BodyPartExamined":
            return _clean([series.body_part_examined])
        if attribute == "SeriesDescription":
            return _clean([series.series_description])
        if attribute == "SOPClassUID":
            return self._sop_classes.get(series.pk, [])
        return self._header_values(attribute, series)

    def _header_values(self, keyword: str, series: Series) -> list[str]:
        if series.pk not in self._headers:
            self._headers[series.pk] = _first_header(series)
        header = self._headers[series.pk]
        if header is None or keyword not in header:
            return []
        value = header[keyword].value
        if value is None:
            return []
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            return _clean([str(v) for v in value])
        return _clean([str(value)])


def _first_header(series: Series) -> pydicom.Dataset | None:
    instance = (
        Instance.objects.filter(series=series, deleted_at=None)
        .exclude(path="")
        .order_by("instance_number", "id")
        .first()
    )
    if instance is None:
        return None
    try:
        return pydicom.dcmread(Path(settings.DATA_DIR) / instance.path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        logger.warning("routing: cannot read header of instance %s: %s", instance.pk, type(exc).__name__)
        return None


def _is_patient_attribute(keyword: str) -> bool:
    tag = tag_for_keyword(keyword)
    return tag is not None and (tag >> 16) == 0x0010  # the Patient group: names, IDs, birth date...


def _clean(values: list[str]) -> list[str]:
    return [v.strip(" \x00") for v in values if v is not None]


def priority_label(priority: int) -> str:
    return Priority(priority).label if priority in Priority.values else str(priority)
