"""Routing app models, one module per seam: core (AE titles, studies, timeline), rules (routing),
pull (poll sources, polls, retrieves, STOW-RS senders), oauth (how we authenticate to HTTPS peers),
audit and access_audit (the audit log, and the receivers that audit every change of users, groups,
permissions and tokens)."""

from routing.models import access_audit  # noqa: F401  (connects the access-change receivers)
from routing.models.audit import AuditAction, AuditEntry
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
from routing.models.oauth import HttpClientAuth, OAuthToken
from routing.models.ops import Heartbeat, HeartbeatRole, OpsCounter
from routing.models.pull import Backfill, Poll, PollSource, StowSender, StudyRetrieve
from routing.models.rules import Operator, RoutingDecision, RoutingRule, RuleCondition

__all__ = [
    "ApplicationEntity",
    "AuditAction",
    "AuditEntry",
    "Backfill",
    "Heartbeat",
    "HeartbeatRole",
    "HttpClientAuth",
    "Instance",
    "OAuthToken",
    "Operator",
    "OpsCounter",
    "Poll",
    "PollSource",
    "Priority",
    "RoutingDecision",
    "RoutingRule",
    "RuleCondition",
    "Series",
    "StoreAssociation",
    "StowSender",
    "Study",
    "StudyEvent",
    "StudyRetrieve",
    "StudyState",
]
