"""The fields and states every small outbox row shares (alert notifications, webhook events):
written in the transaction of what caused it, claimed with a conditional UPDATE and a lease,
retried with backoff, then `failed` for staff to see. The services are in results/outbox.py."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class NotificationState(models.TextChoices):
    PENDING = "pending", "Pending"
    SENDING = "sending", "Sending"
    SENT = "sent", "Sent"
    FAILED = "failed", "Failed"


class OutboxRow(models.Model):
    MAX_ATTEMPTS = 6
    BACKOFF_BASE_SECONDS = 30.0
    BACKOFF_CAP_SECONDS = 1800.0

    state = models.CharField(max_length=8, choices=NotificationState.choices, default=NotificationState.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    lease_until = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True
