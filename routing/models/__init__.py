"""Routing app models, one module per seam: core (AE titles, studies, timeline), rules (routing)."""

from routing.models.core import (
    ApplicationEntity,
    Instance,
    Priority,
    Series,
    StoreAssociation,
    Study,
    StudyEvent,
    StudyState,
)
from routing.models.rules import Operator, RoutingDecision, RoutingRule, RuleCondition

__all__ = [
    "ApplicationEntity",
    "Instance",
    "Operator",
    "Priority",
    "RoutingDecision",
    "RoutingRule",
    "RuleCondition",
    "Series",
    "StoreAssociation",
    "Study",
    "StudyEvent",
    "StudyState",
]
