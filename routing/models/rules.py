"""Routing rules: which studies go to which AI models, how urgently, and why.

Conditions are data, never code: an attribute, an operator from a fixed list and a value.
Matching lives in routing/rules.py; these models only hold and validate the configuration.
"""

from __future__ import annotations

import re
from functools import lru_cache

import re2
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone
from pydicom.datadict import tag_for_keyword

from routing.models.core import Priority, Study

# Attributes read from our own rows instead of the DICOM files. The AE titles are not DICOM
# attributes at all (they come from the association), hence the pseudo-keywords.
CALLING_AE = "CallingAETitle"
CALLED_AE = "CalledAETitle"
DATABASE_ATTRIBUTES = {
    CALLING_AE: "study",
    CALLED_AE: "study",
    "StudyDescription": "study",
    "Modality": "series",
    "BodyPartExamined": "series",
    "SeriesDescription": "series",
    "SOPClassUID": "instances",
}
MAX_REGEX_LENGTH = 200


class Operator(models.TextChoices):
    EQUALS = "equals", "equals"
    ONE_OF = "one_of", "is one of"
    CONTAINS = "contains", "contains"
    REGEX = "regex", "matches regex"
    PRESENT = "present", "is present"
    ABSENT = "absent", "is absent"


# one_of lists are backslash-separated, DICOM's own value delimiter: it cannot occur inside
# the AE/CS/SH/LO values rules compare against, so it never needs escaping.
ONE_OF_SEPARATOR = "\\"
VALUELESS_OPERATORS = {Operator.PRESENT, Operator.ABSENT}


def attribute_problem(attribute: str) -> str | None:
    if attribute in DATABASE_ATTRIBUTES:
        return None
    if not attribute:
        return "choose an attribute (a DICOM keyword such as Modality, or CallingAETitle / CalledAETitle)"
    if tag_for_keyword(attribute) is None:
        return f"{attribute!r} is not a DICOM keyword (they are CamelCase, e.g. BodyPartExamined)"
    return None


def condition_problems(*, attribute: str, operator: str, value: str) -> dict[str, str]:
    """Field name → problem for one condition; empty when it is valid. Shared by save and YAML import."""
    problems: dict[str, str] = {}
    problem = attribute_problem(attribute)
    if problem:
        problems["attribute"] = problem
    if operator not in Operator.values:
        problems["operator"] = f"{operator!r} is not an operator (use one of {', '.join(Operator.values)})"
        return problems
    if operator in VALUELESS_OPERATORS:
        if value:
            problems["value"] = f"the {operator} operator takes no value"
    elif not value.strip():
        problems["value"] = f"the {operator} operator needs a value"
    elif operator == Operator.REGEX:
        if len(value) > MAX_REGEX_LENGTH:
            problems["value"] = f"a regex has at most {MAX_REGEX_LENGTH} characters"
        else:
            try:
                rule_regex(value)
            except ValueError as exc:
                problems["value"] = str(exc)
    return problems


@lru_cache(maxsize=256)
def rule_regex(value: str) -> re2._Regexp:
    """A condition's regex, compiled case-insensitive by RE2 (raises ValueError with the reason).

    RE2 runs in time linear in the value, which the sender controls; Python's `re` backtracks,
    so a pattern like (a+)+$ against a long value would hold a worker (or the dry run) for ever.
    The price: no backreferences and no lookaround, refused here at save time."""
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    try:
        return re2.compile(value, options)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        hint = ""
        if _python_compiles(value):  # valid, but uses what RE2 leaves out to stay linear
            hint = "; RE2 runs in linear time and has no backreferences (\\1) or lookaround ((?=...), (?<!...))"
        raise ValueError(f"invalid regular expression: {reason}{hint}") from None


def _python_compiles(value: str) -> bool:
    try:
        re.compile(value)
    except re.error:
        return False
    return True


class RoutingRule(models.Model):
    """An ordered rule: when all its conditions hold for a study, run its models."""

    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    enabled = models.BooleanField(default=True)
    position = models.PositiveIntegerField(default=100, help_text="Rules are evaluated in ascending order")
    priority = models.SmallIntegerField(
        choices=Priority.choices,
        default=Priority.ROUTINE,
        help_text="Work order in the queue: STAT studies are inferred before routine ones",
    )
    stop_at_first_match = models.BooleanField(
        default=True, help_text="When this rule matches, later rules are not considered"
    )
    ai_models = models.ManyToManyField("results.AIModel", blank=True, related_name="routing_rules")
    # Shadow mode: the rule's models run and their results are recorded and audited, but nothing
    # is delivered. `shadow_ai_models` run in shadow beside the live ones (a new model version
    # tried on the same studies as the current one).
    shadow = models.BooleanField(
        default=False, help_text="Shadow mode: run the models and record the results, deliver nothing"
    )
    shadow_ai_models = models.ManyToManyField(
        "results.AIModel",
        blank=True,
        related_name="shadow_routing_rules",
        help_text="Models run in shadow beside the live ones: recorded, never delivered",
    )
    # Result destinations are added by the delivery issue as a ManyToManyField here
    # (`destinations`), exported/imported next to `models` in the YAML section.
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["position", "id"]

    def __str__(self) -> str:
        return self.name

    def delete_blockers(self) -> list[str]:
        """Why this rule cannot be deleted: destinations still chosen for it (untick them first)."""
        destinations = sorted(self.destinations.values_list("name", flat=True))
        return [f"it sends results to destination(s) {', '.join(destinations)}"] if destinations else []


class RuleCondition(models.Model):
    rule = models.ForeignKey(RoutingRule, on_delete=models.CASCADE, related_name="conditions")
    attribute = models.CharField(
        max_length=64, help_text="A DICOM keyword (Modality, BodyPartExamined, ...) or CallingAETitle / CalledAETitle"
    )
    operator = models.CharField(max_length=16, choices=Operator.choices)
    value = models.CharField(
        max_length=1024, blank=True, help_text="For 'is one of', separate values with a backslash: HEAD\\BRAIN"
    )
    position = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["position", "id"]

    def __str__(self) -> str:
        if self.operator in VALUELESS_OPERATORS:
            return f"{self.attribute} {self.get_operator_display()}"
        # As typed: repr() would double DICOM's backslash separator (HEAD\\BRAIN).
        return f"{self.attribute} {self.get_operator_display()} '{self.value}'"

    def save(self, *args, **kwargs) -> None:
        # Validated on every save, not only in forms: a bad regex must never reach the matcher.
        self.clean()
        super().save(*args, **kwargs)

    def clean(self) -> None:
        problems = condition_problems(attribute=self.attribute, operator=self.operator, value=self.value)
        if problems:
            raise ValidationError(problems)

    @property
    def options(self) -> list[str]:
        return [part.strip() for part in self.value.split(ONE_OF_SEPARATOR) if part.strip()]


class RoutingDecision(models.Model):
    """What routing decided for a study, kept for study_status and audit (a re-route adds a row)."""

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="routing_decisions")
    decided_at = models.DateTimeField(default=timezone.now)
    # Names and ids as they were: rules are edited and deleted, the decision must still read true.
    matched_rules = models.JSONField(default=list, help_text='[{"id": 1, "name": "CT head"}]')
    ai_models = models.ManyToManyField("results.AIModel", blank=True, related_name="routing_decisions")
    # Those of `ai_models` that run in shadow: no matched rule runs them live.
    shadow_ai_models = models.ManyToManyField("results.AIModel", blank=True, related_name="shadow_routing_decisions")
    priority = models.SmallIntegerField(choices=Priority.choices, default=Priority.ROUTINE)
    reason = models.TextField(help_text="Why: the matching rules, or why no rule matched")

    class Meta:
        ordering = ["-decided_at", "-id"]
        get_latest_by = ["decided_at", "id"]

    def __str__(self) -> str:
        return f"Routing of study {self.study_id} at {self.decided_at:%Y-%m-%d %H:%M:%S}"

    @property
    def ignored(self) -> bool:
        return not self.matched_rules
