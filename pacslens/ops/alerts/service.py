"""Evaluate the alert rules and send what changed: one alert when a condition starts, one when it
clears, none in between, however many workers evaluate at once.

`alerts_check` is the scheduled task (every 30-60 s, pacslens/ops/schedules.py) and the body of
`manage.py alerts_check` (for a cron watchdog that still runs when no worker does). A state
change is a compare-and-set on AlertState.active (or the unique (rule, subject) row for a first
start); only the worker whose UPDATE or INSERT won writes the AlertEvent and its notifications,
in the same transaction. Notifications are then claimed like deliveries (conditional UPDATE,
lease), so a channel that is down is retried with backoff and an alert is sent once.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from pacslens.ops.alerts.channels import WEBHOOK_TIMEOUT, AlertMessage, ChannelError, channel_send
from pacslens.ops.alerts.conditions import Evaluation, Firing, clear_text, firing
from results.models import (
    AlertChannel,
    AlertEvent,
    AlertEventKind,
    AlertNotification,
    AlertRule,
    AlertState,
)
from results.outbox import outbox_claim_due, outbox_settle
from routing.models import AuditAction, AuditEntry

logger = logging.getLogger(__name__)


def alerts_check() -> dict[str, int]:
    """Scheduled task: evaluate every enabled rule, then send the notifications that are due."""
    changed = alerts_evaluate()
    sent = notifications_send_due()
    return {"changed": changed, "sent": sent}


def alerts_evaluate(*, now: datetime | None = None) -> int:
    """Start and clear alert states to match the conditions now. Returns how many changed here."""
    run = Evaluation(now)
    now = run.now
    changed = 0
    for rule in AlertRule.objects.filter(enabled=True):
        try:
            current = firing(rule, evaluation=run)
        except Exception:  # one broken condition must not silence the others, nor clear its own alerts
            logger.exception("alert rule %s (%s) could not be evaluated", rule.pk, rule.condition)
            continue
        active = {state.subject: state for state in AlertState.objects.filter(rule=rule, active=True)}
        for subject, what in current.items():
            if subject not in active:
                changed += alert_start(rule=rule, subject=subject, what=what, now=now)
        for subject, state in active.items():
            if subject not in current:
                changed += alert_clear(rule=rule, state=state, now=now)
    return changed


def alert_start(*, rule: AlertRule, subject: str, what: Firing, now: datetime) -> bool:
    """Mark the condition active for `subject`; True (and an event) only for the worker that did."""
    with transaction.atomic():
        state = AlertState.objects.filter(rule=rule, subject=subject).first()
        if state is None:
            try:
                with transaction.atomic():
                    AlertState.objects.create(
                        rule=rule, subject=subject, active=True, message=what.text, started_at=now
                    )
            except IntegrityError:
                return False  # another worker started it first
        elif (
            AlertState.objects.filter(pk=state.pk, active=False).update(
                active=True, message=what.text, started_at=now, cleared_at=None
            )
            != 1
        ):
            return False
        _event(rule=rule, subject=subject, kind=AlertEventKind.STARTED, what=what, now=now)
    return True


def alert_clear(*, rule: AlertRule, state: AlertState, now: datetime) -> bool:
    with transaction.atomic():
        if AlertState.objects.filter(pk=state.pk, active=True).update(active=False, cleared_at=now) != 1:
            return False
        _event(
            rule=rule, subject=state.subject, kind=AlertEventKind.CLEARED, what=clear_text(rule, state.subject), now=now
        )
    return True


def notifications_send_due(*, now: datetime | None = None, limit: int = 100) -> int:
    """Claim and send due notifications; returns how many were sent."""
    lease = timedelta(seconds=2 * max(WEBHOOK_TIMEOUT, float(settings.EMAIL_TIMEOUT)) + 30)
    claimed = outbox_claim_due(AlertNotification, lease=lease, limit=limit, related=("event", "channel"), now=now)
    return sum(notification_send(notification=notification) for notification in claimed)


def notification_send(*, notification: AlertNotification) -> bool:
    """Send one claimed notification and record the outcome."""
    channel, event = notification.channel, notification.event
    error = ""
    if not channel.enabled:
        error = "the channel was disabled before the alert went out"
    else:
        try:
            channel_send(channel, message_of(event))
        except ChannelError as exc:
            error = str(exc)
    outbox_settle(notification, error=error, give_up=not channel.enabled)
    if not error:
        AlertChannel.objects.filter(pk=channel.pk).update(last_sent_at=timezone.now(), last_error="")
        return True
    AlertChannel.objects.filter(pk=channel.pk).update(last_error=error[:300])
    logger.warning("alert %s to channel %s: %s", event.pk, channel.name, error)
    return False


class ChannelIncomplete(ValueError):
    """The channel is not complete enough to send to (the message says what to fix)."""


def alert_test_send(*, channel: AlertChannel, actor: str, request=None, where: str = "the Alerts page") -> str:
    """The Send test alert button: "" when it went out, else why not (a channel not complete
    enough to send to is refused, unaudited, before anything is sent)."""
    try:
        channel.full_clean()
    except Exception as exc:  # ValidationError: not complete enough to send to
        raise ChannelIncomplete(f"Fix the channel first: {'; '.join(getattr(exc, 'messages', [str(exc)]))}") from None
    return alert_send_test(channel=channel, actor=actor, request=request, where=where)


def alert_send_test(*, channel: AlertChannel, actor: str, request=None, where: str = "the Alerts page") -> str:
    """Send a test alert now (not through the outbox: the staff member waits for the answer).
    Returns "" on success, else what went wrong; audited either way."""
    message = AlertMessage(
        kind="test",
        condition="test",
        subject="",
        title="Test alert",
        text=f"A test alert sent by {actor} from {where}. If you read this, channel {channel.name} works.",
        at=timezone.localtime(),
    )
    try:
        channel_send(channel, message)
        error = ""
    except ChannelError as exc:
        error = str(exc)
    now = timezone.now()
    if error:
        AlertChannel.objects.filter(pk=channel.pk).update(last_error=error[:300])
    else:
        AlertChannel.objects.filter(pk=channel.pk).update(last_sent_at=now, last_error="")
    AuditEntry.record(
        actor=actor,
        action=AuditAction.TEST,
        obj=channel,
        object_repr=f"alert channel {channel.name}",
        detail=f"failed: {error}" if error else "test alert sent",
        request=request,
    )
    return error


def message_of(event: AlertEvent) -> AlertMessage:
    return AlertMessage(
        kind=event.kind,
        condition=event.condition,
        subject=event.subject,
        title=event.title,
        text=event.text,
        at=timezone.localtime(event.at),
    )


def _event(*, rule: AlertRule, subject: str, kind: str, what: Firing, now: datetime) -> AlertEvent:
    event = AlertEvent.objects.create(
        rule=rule, condition=rule.condition, subject=subject, kind=kind, title=what.title[:200], text=what.text, at=now
    )
    AlertNotification.objects.bulk_create(
        AlertNotification(event=event, channel=channel, next_attempt_at=now)
        for channel in AlertChannel.objects.filter(enabled=True)
    )
    logger.info("alert %s %s: rule %s, subject %s", event.pk, kind, rule.name, subject)
    return event
