"""Results app models, one module per seam: alerts (channels, rules, their state), inference (model registry, results), delivery (ledger)."""

from results.models.alerts import (
    AlertChannel,
    AlertChannelKind,
    AlertCondition,
    AlertEvent,
    AlertEventKind,
    AlertNotification,
    AlertRule,
    AlertState,
    NotificationState,
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
]
