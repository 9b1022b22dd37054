"""Outbound event webhooks: record events in the transaction that causes them, send them signed.

`webhook_events_record` runs inside the state change it reports (delivery_record in the ledger,
study_infer in inference) and writes one WebhookEvent per enabled subscription to that event
type; the commit wakes a worker. `webhooks_send_due` (the thin task, the due-time timer and a
one-minute sweep run it) claims due rows through results/outbox.py, POSTs each and records the
outcome: retried with jittered exponential backoff up to `WebhookEvent.MAX_ATTEMPTS`, then
`failed` (shown on the Webhooks page).

What a receiver gets (docs/api.md#webhooks): the JSON body, byte for byte the same on every
re-send, and

    X-PacsLens-Event-Id: <the event's UUID, the same on every re-send>
    X-PacsLens-Event-Type: study.delivered | delivery.failed | result.flagged
    X-PacsLens-Timestamp: <unix seconds of this attempt>
    X-PacsLens-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<raw body>" with the secret>

The URL is called from the workers (not from a browser): only http and https, redirects are
not followed, and errors keep only the exception's class (a URL may embed a credential).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from datetime import timedelta
from typing import Any

import requests
from django.db import transaction
from django.utils import timezone
from django_q.tasks import async_task

from results.models import (
    Delivery,
    InferenceResult,
    WebhookEvent,
    WebhookSubscription,
)
from results.models.inference import ResultStatus
from results.models.webhooks import signing_secret_new
from results.outbox import outbox_claim_due, outbox_settle
from routing.models import AuditAction, AuditEntry, Study
from routing.models.audit import config_snapshot

logger = logging.getLogger(__name__)

WEBHOOK_TIMEOUT = 10.0
WEBHOOK_LEASE = timedelta(seconds=2 * WEBHOOK_TIMEOUT + 30)
SEND_TASK = "results.delivery_tasks.send_webhooks"
USER_AGENT = "PacsLens-Webhooks/1"


# --- the outbox: called inside the transaction of the state change ---------------------------


def webhook_events_record(
    *, event_type: str, study: Study, result: InferenceResult | None = None, delivery: Delivery | None = None
) -> list[WebhookEvent]:
    """One event row per enabled subscription to `event_type`; wakes a worker on commit."""
    subscriptions = [s for s in WebhookSubscription.objects.filter(enabled=True) if event_type in s.event_types]
    if not subscriptions:
        return []
    data = event_data(study=study, result=result, delivery=delivery)
    now = timezone.now()
    rows = WebhookEvent.objects.bulk_create(
        WebhookEvent(subscription=s, event_type=event_type, payload=data, created_at=now, next_attempt_at=now)
        for s in subscriptions
    )
    transaction.on_commit(enqueue_webhooks)
    return rows


def event_data(*, study: Study, result: InferenceResult | None, delivery: Delivery | None) -> dict[str, Any]:
    """What an event says: the study by id and Study Instance UID, the result, the delivery.
    Never patient data: no name, patient ID, birth date, nor accession number."""
    data: dict[str, Any] = {"study": {"id": study.pk, "study_instance_uid": study.study_instance_uid}}
    if result is not None:
        data["result"] = result_data(result)
    if delivery is not None:
        data["delivery"] = {
            "id": delivery.pk,
            "destination": delivery.destination.name,
            "kind": delivery.kind,
            "attempts": delivery.attempts,
            "error_class": delivery.last_error_class or None,
            "result_uid": str(delivery.result.uid),
        }
    if result is None and delivery is None:
        current = study.inference_results.current().live().filter(status=ResultStatus.SUCCEEDED)
        data["results"] = [result_data(r) for r in current.order_by("model_name")]
    return data


def result_data(result: InferenceResult) -> dict[str, Any]:
    return {
        "uid": str(result.uid),
        "model": result.model_name,
        "model_version": result.model_version,
        "score": result.score,
        "flagged": result.flagged,
        "label": result.label,
    }


def enqueue_webhooks() -> None:
    async_task(SEND_TASK)


# --- configuration (the Webhooks page and the API) -------------------------------------------


def webhook_subscription_save(
    *, subscription: WebhookSubscription, actor: str, rotate_secret: bool = False, request=None
) -> str:
    """Validate, save and audit a subscription (new or changed). Returns the signing secret when
    one was made here (none given, or `rotate_secret`): shown once, never again.
    Raises ValidationError with the model's messages."""
    creating = subscription.pk is None
    before = None if creating else _snapshot(WebhookSubscription.objects.get(pk=subscription.pk))
    made = ""
    if rotate_secret or not subscription.secret:
        made = subscription.secret = signing_secret_new()
    subscription.full_clean()
    with transaction.atomic():
        subscription.save()
        AuditEntry.record(
            actor=actor,
            action=AuditAction.CREATE if creating else AuditAction.UPDATE,
            obj=subscription,
            object_repr=f"webhook {subscription.name}",
            before=before,
            after=_snapshot(subscription),
            detail="signing secret made" if made else "",
            request=request,
        )
    return made


def webhook_subscription_delete(*, subscription: WebhookSubscription, actor: str, request=None) -> None:
    with transaction.atomic():
        before = _snapshot(subscription)
        pk = subscription.pk
        subscription.delete()
        AuditEntry.record(
            actor=actor,
            action=AuditAction.DELETE,
            object_repr=f"webhook {before['name']}",
            detail=f"results.webhooksubscription {pk}",
            before=before,
            request=request,
        )


def _snapshot(subscription: WebhookSubscription) -> dict[str, Any]:
    return {k: v for k, v in config_snapshot(subscription).items() if k not in ("last_sent_at", "last_error")}


# --- workers ---------------------------------------------------------------------------------


def webhooks_send_due(*, limit: int = 100) -> int:
    """Claim and send due events; returns how many were sent."""
    claimed = outbox_claim_due(WebhookEvent, lease=WEBHOOK_LEASE, limit=limit, related=("subscription",))
    return sum(webhook_send(event=event) for event in claimed)


def webhook_send(*, event: WebhookEvent) -> bool:
    """POST one claimed event and record the outcome on its row and its subscription."""
    subscription = event.subscription
    error = ""
    if not subscription.enabled:
        error = "the subscription was disabled before the event went out"
    elif subscription.url_unreadable or subscription.secret_unreadable:
        error = "the stored URL or signing secret cannot be decrypted with the configured keys: enter it again"
    else:
        error = _post(subscription, event)
    state = outbox_settle(event, error=error, give_up=not subscription.enabled)
    now = timezone.now()
    if not error:
        WebhookSubscription.objects.filter(pk=subscription.pk).update(last_sent_at=now, last_error="")
        return True
    WebhookSubscription.objects.filter(pk=subscription.pk).update(last_error=error[:300])
    logger.warning(
        "webhook %s (%s) to %s, attempt %s: %s; now %s",
        event.event_id,
        event.event_type,
        subscription.name,
        event.attempts,
        error,
        state,
    )
    return False


def event_body(event: WebhookEvent) -> bytes:
    """The body, the same bytes on every re-send (sorted keys, no whitespace)."""
    body = {
        "id": str(event.event_id),
        "type": event.event_type,
        "created_at": event.created_at.isoformat(),
        "data": event.payload,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=` and the hex HMAC-SHA256 of `<timestamp>.<body>` keyed with the subscription's secret."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def signed_headers(secret: str, event: WebhookEvent, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-PacsLens-Event-Id": str(event.event_id),
        "X-PacsLens-Event-Type": event.event_type,
        "X-PacsLens-Timestamp": stamp,
        "X-PacsLens-Signature": signature(secret, stamp, body),
    }


def _post(subscription: WebhookSubscription, event: WebhookEvent) -> str:
    """ "" when the receiver answered 2xx, else what went wrong (safe to store and show)."""
    body = event_body(event)
    try:
        response = requests.post(
            subscription.webhook_url,
            data=body,
            headers=signed_headers(subscription.secret, event, body),
            timeout=WEBHOOK_TIMEOUT,
            allow_redirects=False,
        )
    except requests.RequestException as exc:  # its text quotes the URL, which may hold a credential
        return f"cannot reach the receiver ({type(exc).__name__})"
    if not 200 <= response.status_code < 300:
        return f"the receiver answered HTTP {response.status_code}"
    return ""
