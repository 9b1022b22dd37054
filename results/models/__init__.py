"""Results app models, one module per seam: alerts (channels, rules, their state), inference (model registry, results), delivery (ledger), webhooks (subscriptions, their event outbox), outbox (what those outboxes share)."""

from results.models.alerts import (
    AlertChannel,
    AlertChannelKind,
    AlertCondition,
    AlertEvent,
    AlertEventKind,
    AlertNotification,
    AlertRule,
    AlertState,
    WebhookFormat,
)
from results.models.coding import CodingProfile
from results.models.delivery import (
    AckAction,
    AuthKind,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Destination,
    DestinationKind,
    ErrorClass,
)
from results.models.inference import (
    AIModel,
    FailureReason,
    ImmutableResultError,
    InferenceResult,
    ResultStatus,
)
from results.models.installation import Installation
from results.models.outbox import NotificationState, OutboxRow
from results.models.webhooks import EVENT_TYPES, WebhookEvent, WebhookEventType, WebhookSubscription

__all__ = [
    "AlertChannel",
    "AlertChannelKind",
    "AlertCondition",
    "AlertEvent",
    "AlertEventKind",
    "AlertNotification",
    "AlertRule",
    "AlertState",
    "NotificationState",
    "WebhookFormat",
    "AckAction",
    "CodingProfile",
    "AuthKind",
    "Delivery",
    "DeliveryAttempt",
    "DeliveryState",
    "Destination",
    "DestinationKind",
    "ErrorClass",
    "AIModel",
    "FailureReason",
    "ImmutableResultError",
    "InferenceResult",
    "Installation",
    "ResultStatus",
    "OutboxRow",
    "EVENT_TYPES",
    "WebhookEvent",
    "WebhookEventType",
    "WebhookSubscription",
]
