"""Outbound event webhooks: who wants to hear of which events, and one outbox row per event and
subscription.

A WebhookEvent row is written in the transaction of the state change it reports (a delivery
recorded failed, a study settled delivered, a live result flagged), so an event is never lost
nor reported for a change that rolled back. Its body is fixed when written; every re-send
carries the same `event_id`, so a receiver de-duplicates. Bodies name the study by its internal
id and Study Instance UID and carry model, score and flag: never patient data, not even the
accession number.
"""

from __future__ import annotations

import secrets
import uuid

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import models
from django.utils import timezone

from results.models.outbox import OutboxRow
from results.models.sealed import SealedSecretField, UnreadableSecret


class WebhookEventType(models.TextChoices):
    STUDY_DELIVERED = "study.delivered", "Study delivered (every delivery of its current results succeeded)"
    DELIVERY_FAILED = "delivery.failed", "Delivery failed (it went to the failure queue)"
    RESULT_FLAGGED = "result.flagged", "Result flagged (a live model's score reached its threshold)"


EVENT_TYPES = [choice.value for choice in WebhookEventType]


def signing_secret_new() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


class WebhookSubscription(models.Model):
    """An HTTP(S) endpoint that receives signed JSON events. The URL (it may embed a credential)
    and the signing secret are sealed at rest and write-only."""

    name = models.SlugField(max_length=50, unique=True)
    webhook_url = SealedSecretField(blank=True)
    secret = SealedSecretField(blank=True)
    events = models.CharField(
        max_length=200,
        default=",".join(EVENT_TYPES),
        help_text="Comma-separated: " + ", ".join(EVENT_TYPES),
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    last_sent_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def event_types(self) -> list[str]:
        return [part.strip() for part in self.events.split(",") if part.strip()]

    @property
    def url_unreadable(self) -> bool:
        return isinstance(self.webhook_url, UnreadableSecret)

    @property
    def secret_unreadable(self) -> bool:
        return isinstance(self.secret, UnreadableSecret)

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if not self.url_unreadable:
            try:
                URLValidator(schemes=["http", "https"])(self.webhook_url)
            except ValidationError:
                errors["webhook_url"] = "Enter the receiver's URL, starting with https:// (or http://)."
        if self.secret and not self.secret_unreadable and len(self.secret) < 16:
            errors["secret"] = "A signing secret needs at least 16 characters (leave it empty to have one made)."
        unknown = [event for event in self.event_types if event not in EVENT_TYPES]
        if unknown:
            errors["events"] = f"Unknown event(s) {', '.join(unknown)}; choose from {', '.join(EVENT_TYPES)}."
        elif not self.event_types:
            errors["events"] = "Choose at least one event."
        if errors:
            raise ValidationError(errors)


class WebhookEvent(OutboxRow):
    """One event for one subscription: the outbox row the sender claims."""

    MAX_ATTEMPTS = 8
    BACKOFF_BASE_SECONDS = 10.0

    subscription = models.ForeignKey(WebhookSubscription, on_delete=models.CASCADE, related_name="outbox")
    event_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    event_type = models.CharField(max_length=20, choices=WebhookEventType.choices)
    payload = models.JSONField(help_text="The body's `data`, fixed when the event happened; never patient data")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        # Not partial: SQLite cannot match a partial index's condition to a query's bound
        # parameters, and the timer asks "first due pending row" four times a second.
        indexes = [models.Index(fields=["state", "next_attempt_at"], name="webhookevent_due_idx")]

    def __str__(self) -> str:
        return f"{self.event_type} {self.event_id} to {self.subscription_id}: {self.state}"
