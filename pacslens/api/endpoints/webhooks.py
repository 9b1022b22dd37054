"""Outbound event webhooks: subscriptions (create, read, change, delete) and what was sent to
each. As the other configuration objects: the staff permissions (PACS administrators manage,
auditors read), an ETag and `If-Match` on writes, the URL and signing secret write-only (the
secret is answered once, when made), every change audited. Sending: results/deliver/webhooks.py."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from ninja import Router

from pacslens.api import schemas
from pacslens.api.auth import require
from pacslens.api.problems import Problem
from results.deliver.webhooks import webhook_subscription_delete, webhook_subscription_save
from results.models import EVENT_TYPES, NotificationState, WebhookSubscription

router = Router(tags=["webhooks"])
VIEW = ("results.view_webhooksubscription",)
ADD = (*VIEW, "results.add_webhooksubscription")
CHANGE = (*VIEW, "results.change_webhooksubscription")
DELETE = (*VIEW, "results.delete_webhooksubscription")
EVENT_ROWS = 200
ITEM = "/webhooks/{int:webhook_id}"


@router.get("/webhooks", response=list[schemas.Webhook], summary="List webhook subscriptions")
def webhook_list(request: HttpRequest):
    require(request, *VIEW)
    return [_out(s) for s in WebhookSubscription.objects.all()]


@router.get(ITEM, response=schemas.Webhook, summary="Read a webhook subscription")
def webhook_read(request: HttpRequest, response: HttpResponse, webhook_id: int):
    require(request, *VIEW)
    return _answer(get_object_or_404(WebhookSubscription, pk=webhook_id), response)


@router.post("/webhooks", response={201: schemas.Webhook}, summary="Create a webhook subscription")
def webhook_create(request: HttpRequest, response: HttpResponse, body: schemas.WebhookIn):
    """The signing secret is answered once (`secret`): keep it, it is never shown again."""
    client = require(request, *ADD)
    if WebhookSubscription.objects.filter(name=body.name).exists():
        raise Problem(409, f"{body.name} already exists.", errors=[("name", "Another webhook has this name.")])
    subscription = WebhookSubscription(
        name=body.name,
        webhook_url=body.url,
        events=",".join(body.events if body.events is not None else EVENT_TYPES),
        enabled=body.enabled,
        secret=body.secret or "",
    )
    made = _save(subscription, actor=client.actor, request=request)
    response["Location"] = request.build_absolute_uri(f"{request.path.rstrip('/')}/{subscription.pk}")
    return 201, _answer(subscription, response, secret=made)


@router.patch(ITEM, response=schemas.Webhook, summary="Change a webhook subscription")
def webhook_patch(request: HttpRequest, response: HttpResponse, webhook_id: int, body: schemas.WebhookPatch):
    """The fields given replace the subscription's. Needs `If-Match`."""
    client = require(request, *CHANGE)
    with transaction.atomic():
        subscription = _locked(request, webhook_id)
        changes = body.dict(exclude_unset=True)
        if "name" in changes and (
            WebhookSubscription.objects.filter(name=changes["name"]).exclude(pk=subscription.pk).exists()
        ):
            raise Problem(
                409, f"{changes['name']} already exists.", errors=[("name", "Another webhook has this name.")]
            )
        for field, attribute in (
            ("name", "name"),
            ("url", "webhook_url"),
            ("enabled", "enabled"),
            ("secret", "secret"),
        ):
            if changes.get(field) is not None:
                setattr(subscription, attribute, changes[field])
        if changes.get("events") is not None:
            subscription.events = ",".join(changes["events"])
        made = _save(
            subscription, actor=client.actor, request=request, rotate_secret=bool(changes.get("rotate_secret"))
        )
    return _answer(subscription, response, secret=made)


@router.delete(ITEM, response={204: None}, summary="Delete a webhook subscription")
def webhook_delete(request: HttpRequest, webhook_id: int):
    """Needs `If-Match`. Its unsent events go with it."""
    client = require(request, *DELETE)
    with transaction.atomic():
        webhook_subscription_delete(subscription=_locked(request, webhook_id), actor=client.actor, request=request)
    return 204, None


@router.get(f"{ITEM}/events", response=list[schemas.WebhookEventRow], summary="Events sent to a webhook")
def webhook_events(request: HttpRequest, webhook_id: int, state: str | None = None):
    """The most recent 200 events for this subscription, newest first; `state` filters
    (pending, sending, sent, failed)."""
    require(request, *VIEW)
    subscription = get_object_or_404(WebhookSubscription, pk=webhook_id)
    if state is not None and state not in NotificationState.values:
        raise Problem(422, "Unknown state.", errors=[("state", f"One of {', '.join(NotificationState.values)}.")])
    rows = subscription.outbox.all()
    if state:
        rows = rows.filter(state=state)
    return [
        {
            "event_id": str(e.event_id),
            "type": e.event_type,
            "state": e.state,
            "attempts": e.attempts,
            "created_at": e.created_at,
            "next_attempt_at": e.next_attempt_at,
            "sent_at": e.sent_at,
            "last_error": e.last_error,
        }
        for e in rows[:EVENT_ROWS]
    ]


# --- helpers ---------------------------------------------------------------------------------


def _out(subscription: WebhookSubscription, *, secret: str = "") -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": subscription.pk,
        "name": subscription.name,
        "events": subscription.event_types,
        "enabled": subscription.enabled,
        "url_set": bool(subscription.webhook_url or subscription.url_unreadable),
        "created_at": subscription.created_at,
        "updated_at": subscription.updated_at,
        "last_sent_at": subscription.last_sent_at,
        "last_error": subscription.last_error,
    }
    data["etag"] = _etag(subscription)
    if secret:
        data["secret"] = secret
    return data


def _etag(subscription: WebhookSubscription) -> str:
    # What an editor sees and sets (the write-only fields through updated_at, which every save moves).
    state = [subscription.name, subscription.events, subscription.enabled, subscription.updated_at.isoformat()]
    return f'"{hashlib.sha256(json.dumps(state).encode()).hexdigest()[:32]}"'


def _answer(subscription: WebhookSubscription, response: HttpResponse, *, secret: str = "") -> dict[str, Any]:
    data = _out(subscription, secret=secret)
    response["ETag"] = data["etag"]
    return data


def _locked(request: HttpRequest, webhook_id: int) -> WebhookSubscription:
    """The subscription, locked for this transaction, if `If-Match` names its current ETag."""
    given = request.headers.get("If-Match")
    if not given:
        raise Problem(428, "Send If-Match with the ETag you read, so a change made meanwhile is not overwritten.")
    subscription = get_object_or_404(WebhookSubscription.objects.select_for_update(), pk=webhook_id)
    current = _etag(subscription)
    if given.strip() != "*" and current not in [tag.strip() for tag in given.split(",")]:
        raise Problem(
            412, "It was changed since you read it: read it again and re-apply your change.", headers={"ETag": current}
        )
    return subscription


def _save(subscription: WebhookSubscription, *, actor: str, request: HttpRequest, rotate_secret: bool = False) -> str:
    try:
        return webhook_subscription_save(
            subscription=subscription, actor=actor, rotate_secret=rotate_secret, request=request
        )
    except ValidationError as exc:
        errors = [
            ("url" if field == "webhook_url" else field, message)
            for field, messages in exc.message_dict.items()
            for message in messages
        ]
        raise Problem(422, errors[0][1], errors=errors) from None
