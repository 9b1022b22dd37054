"""Alerts to the site's IT team: channels (e-mail, webhook), rules (which conditions to watch),
and the state that makes each alert go out once.

An AlertState row per (rule, subject) says whether a condition is active. Workers evaluate the
rules on a schedule; whoever flips a state (compare-and-set on `active`) writes the AlertEvent
and one AlertNotification per channel in the same transaction, and the notifications are then
sent like deliveries: claimed with a conditional UPDATE, retried with backoff. So several
workers send one alert when a condition starts and one when it clears, and a dead SMTP server
delays an alert but does not lose it. Nothing here ever holds patient data: alerts name
destinations, sources, AE titles, models and counts.
"""

from __future__ import annotations

import re
from datetime import time

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, URLValidator, validate_email
from django.db import models
from django.utils import timezone

from results.models.outbox import OutboxRow
from results.models.sealed import SealedSecretField, UnreadableSecret
from routing.validators import validate_ae_title

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class AlertChannelKind(models.TextChoices):
    EMAIL = "email", "E-mail"
    WEBHOOK = "webhook", "Webhook (JSON POST)"


class WebhookFormat(models.TextChoices):
    GENERIC = "generic", "Generic JSON"
    TEAMS = "teams", "Microsoft Teams (workflow webhook, Adaptive Card)"
    SLACK = "slack", "Slack incoming webhook"


def email_list(value: str) -> list[str]:
    return [part.strip() for part in re.split(r"[,;\s]+", value) if part.strip()]


def validate_email_list(value: str) -> None:
    for address in email_list(value):
        try:
            validate_email(address)
        except ValidationError:
            raise ValidationError(f"{address!r} is not an e-mail address") from None


class AlertChannel(models.Model):
    """Where alerts go. Every enabled channel receives every alert."""

    CONFIG_FIELDS = ["name", "kind", "enabled", "email_to", "webhook_format"]

    name = models.SlugField(max_length=50, unique=True)
    kind = models.CharField(max_length=10, choices=AlertChannelKind.choices)
    enabled = models.BooleanField(default=True)
    email_to = models.CharField(
        max_length=500, blank=True, validators=[validate_email_list], help_text="Addresses, comma-separated"
    )
    # A Slack or Teams webhook URL is itself the credential: sealed at rest, never exported.
    webhook_url = SealedSecretField(blank=True)
    webhook_format = models.CharField(max_length=10, choices=WebhookFormat.choices, default=WebhookFormat.GENERIC)
    last_sent_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def recipients(self) -> list[str]:
        return email_list(self.email_to)

    @property
    def webhook_url_unreadable(self) -> bool:
        return isinstance(self.webhook_url, UnreadableSecret)

    def clean(self) -> None:
        if self.kind == AlertChannelKind.EMAIL and not self.recipients:
            raise ValidationError({"email_to": "An e-mail channel needs at least one address."})
        if self.kind == AlertChannelKind.WEBHOOK and not self.webhook_url_unreadable:
            try:
                URLValidator(schemes=["http", "https"])(self.webhook_url)
            except ValidationError:
                raise ValidationError(
                    {"webhook_url": "Enter the webhook URL, starting with https:// (or http://)."}
                ) from None


class AlertCondition(models.TextChoices):
    FAILURE_QUEUE = "failure_queue", "Deliveries in the failure queue (per destination)"
    CIRCUIT_OPEN = "circuit_open", "A destination's circuit breaker is open"
    PULL_FAILED = "pull_failed", "A retrieve or poll failed for good (per poll source)"
    SENDER_SILENT = "sender_silent", "Nothing received from a sender for N hours of its expected hours"
    DISK_LOW = "disk_low", "Free disk space below the warning level"
    MODEL_FAILURE_RATE = "model_failure_rate", "A model's failure rate above a threshold"
    FLAG_SHARE = "flag_share", "A model's share of flagged results outside its band"
    HEARTBEAT_MISSING = "heartbeat_missing", "A listener or worker heartbeat missing"


class AlertRule(models.Model):
    """One condition to watch, with its parameters (only those of its condition are used)."""

    CONFIG_FIELDS = [
        "name",
        "condition",
        "enabled",
        "ae_title",
        "hours",
        "weekdays",
        "active_from",
        "active_to",
        "model_name",
        "threshold_percent",
        "min_share_percent",
        "max_share_percent",
        "window_hours",
        "min_results",
    ]

    name = models.SlugField(max_length=50, unique=True)
    condition = models.CharField(max_length=20, choices=AlertCondition.choices)
    enabled = models.BooleanField(default=True)
    # sender_silent
    ae_title = models.CharField(
        max_length=16, blank=True, validators=[validate_ae_title], help_text="sender_silent: the calling AE title"
    )
    hours = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0.1)], help_text="sender_silent: N hours of silence"
    )
    weekdays = models.CharField(
        max_length=40,
        blank=True,
        default="mon,tue,wed,thu,fri",
        help_text="sender_silent: days it is expected to send, e.g. mon,tue,wed,thu,fri",
    )
    active_from = models.TimeField(null=True, blank=True, help_text="sender_silent: expected from (site time)")
    active_to = models.TimeField(null=True, blank=True, help_text="sender_silent: expected until (site time)")
    # model_failure_rate, flag_share
    model_name = models.CharField(max_length=100, blank=True, help_text="Model name; empty: every model")
    threshold_percent = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0), MaxValueValidator(100)],
        help_text="model_failure_rate: alert above this share of failed results",
    )
    min_share_percent = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0), MaxValueValidator(100)]
    )
    max_share_percent = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0), MaxValueValidator(100)]
    )
    window_hours = models.FloatField(default=24.0, validators=[MinValueValidator(0.1)])
    min_results = models.PositiveIntegerField(
        default=10, help_text="Judge a model's rates only over at least this many results"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def weekday_numbers(self) -> set[int]:
        return {WEEKDAYS.index(day) for day in _weekday_tokens(self.weekdays) if day in WEEKDAYS}

    def parameters_text(self) -> str:
        """The parameters its condition uses, for the Alerts page."""
        window = f"over {self.window_hours:g} h, at least {self.min_results} results"
        if self.condition == AlertCondition.SENDER_SILENT:
            begin, until = self.expected_window()
            hours = "all day" if not (self.active_from or self.active_to) else f"{begin:%H:%M}–{until:%H:%M}"
            return f"{self.ae_title}: {self.hours:g} h silent on {self.weekdays}, {hours}"
        if self.condition == AlertCondition.MODEL_FAILURE_RATE:
            return f"{self.model_name or 'every model'}: above {self.threshold_percent:g} % failed, {window}"
        if self.condition == AlertCondition.FLAG_SHARE:
            low = "0" if self.min_share_percent is None else f"{self.min_share_percent:g}"
            high = "100" if self.max_share_percent is None else f"{self.max_share_percent:g}"
            return f"{self.model_name}: flagged share outside {low}–{high} %, {window}"
        return ""

    def expected_window(self) -> tuple[time, time]:
        return self.active_from or time(0, 0), self.active_to or time(23, 59, 59, 999999)

    def clean(self) -> None:
        errors: dict[str, str] = {}
        unknown = [day for day in _weekday_tokens(self.weekdays) if day not in WEEKDAYS]
        if unknown:
            errors["weekdays"] = f"Unknown day(s) {', '.join(unknown)}; use {','.join(WEEKDAYS)}."
        if self.condition == AlertCondition.SENDER_SILENT:
            if not self.ae_title:
                errors["ae_title"] = "Name the sender's calling AE title."
            if not self.hours:
                errors["hours"] = "How many hours of silence (within its expected hours) are too many?"
            if not self.weekday_numbers and "weekdays" not in errors:
                errors["weekdays"] = "Name at least one day the sender is expected to send."
            if self.active_from and self.active_to and self.active_from >= self.active_to:
                errors["active_to"] = "Must be later than 'active from' (the window is within one day)."
        if self.condition == AlertCondition.MODEL_FAILURE_RATE and self.threshold_percent is None:
            errors["threshold_percent"] = "Give the failure rate, in percent, above which to alert."
        if self.condition == AlertCondition.FLAG_SHARE:
            if not self.model_name:
                errors["model_name"] = "A flagged-share band is per model: name it."
            if self.min_share_percent is None and self.max_share_percent is None:
                errors["min_share_percent"] = "Give a minimum or a maximum share (or both), in percent."
            elif (
                self.min_share_percent is not None
                and self.max_share_percent is not None
                and self.min_share_percent > self.max_share_percent
            ):
                errors["max_share_percent"] = "Must be at least the minimum share."
        if errors:
            raise ValidationError(errors)


def _weekday_tokens(value: str) -> list[str]:
    return [part.strip().lower()[:3] for part in re.split(r"[,\s]+", value or "") if part.strip()]


class AlertState(models.Model):
    """Whether a rule's condition is active for one subject (a destination, a source, a model...)."""

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="states")
    subject = models.CharField(max_length=120, blank=True)
    active = models.BooleanField(default=False)
    message = models.TextField(blank=True, help_text="What the start alert said; never patient data")
    started_at = models.DateTimeField(default=timezone.now)
    cleared_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["rule", "subject"], name="alertstate_rule_subject_unique")]

    def __str__(self) -> str:
        return f"{self.rule_id}/{self.subject}: {'active' if self.active else 'clear'}"


class AlertEventKind(models.TextChoices):
    STARTED = "started", "Started"
    CLEARED = "cleared", "Cleared"


class AlertEvent(models.Model):
    """One alert as sent: a condition started or cleared. The text is final when written."""

    rule = models.ForeignKey(AlertRule, null=True, on_delete=models.SET_NULL, related_name="events")
    condition = models.CharField(max_length=20, choices=AlertCondition.choices)
    subject = models.CharField(max_length=120, blank=True)
    kind = models.CharField(max_length=8, choices=AlertEventKind.choices)
    title = models.CharField(max_length=200)
    text = models.TextField()
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.kind}: {self.title}"


class AlertNotification(OutboxRow):
    """One event to one channel: the outbox row the sender claims."""

    event = models.ForeignKey(AlertEvent, on_delete=models.CASCADE, related_name="notifications")
    channel = models.ForeignKey(AlertChannel, on_delete=models.CASCADE, related_name="notifications")

    class Meta:
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                name="alertnotification_due_idx",
                condition=models.Q(state__in=["pending", "sending"]),
            )
        ]

    def __str__(self) -> str:
        return f"Alert {self.event_id} to {self.channel_id}: {self.state}"
