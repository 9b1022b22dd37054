"""STOW-RS senders: the systems allowed to STOW-RS to /dicomweb/studies with their own bearer
token. List, create (the token is in the answer once, never again) and revoke, through the
functions `manage.py stow_token` uses; the access audit records each change, attributed to the
API client as it is to the logged-in user or the command's operating-system user."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from ninja import Router

from pacslens.api import schemas
from pacslens.api.auth import require
from pacslens.api.problems import Problem
from routing import stow_senders as senders
from routing.models import StowSender
from routing.models.access_audit import audit_as

router = Router(tags=["STOW-RS senders"])
# The endpoints page lists them with routing.view_stowsender; creating and revoking are the
# model's add and change (PACS administrators).
VIEW = ("routing.view_stowsender",)
CREATE = ("routing.view_stowsender", "routing.add_stowsender")
REVOKE = ("routing.view_stowsender", "routing.change_stowsender")


def _row(sender: StowSender) -> dict:
    return {
        "id": sender.pk,
        "name": sender.name,
        "ae_title": sender.application_entity.ae_title if sender.application_entity else None,
        "token_hint": sender.token_hint,
        "active": sender.revoked_at is None,
        "created_at": sender.created_at,
        "revoked_at": sender.revoked_at,
        "last_used_at": sender.last_used_at,
    }


@router.get("/stow-senders", response=list[schemas.StowSender], summary="List STOW-RS senders")
def stow_sender_list(request: HttpRequest):
    """Senders, their token hints and last use (never the tokens)."""
    require(request, *VIEW)
    return [_row(s) for s in StowSender.objects.select_related("application_entity")]


@router.post("/stow-senders", response={201: schemas.StowSenderCreated}, summary="Create a STOW-RS sender")
def stow_sender_create(request: HttpRequest, response: HttpResponse, body: schemas.StowSenderIn):
    """A new sender and its token, in this answer only (only its hash is kept). The name (an AE
    title, at most 16 characters) is recorded as the calling AE of what it sends; `ae_title`
    links an existing AE (its quiet period and routing rules). To replace a token, revoke the
    sender and create another under a new name."""
    client = require(request, *CREATE)
    try:
        with audit_as(client.actor, request):
            sender, token = senders.stow_sender_create(name=body.name, ae_title=body.ae_title or "")
    except senders.StowSenderExists as exc:
        raise Problem(409, str(exc), errors=[("name", str(exc))]) from None
    except ValidationError as exc:
        errors = [(field, message) for field, messages in exc.message_dict.items() for message in messages]
        raise Problem(422, errors[0][1], errors=errors) from None
    response["Location"] = request.build_absolute_uri(f"{request.path.rstrip('/')}/{sender.pk}")
    return 201, {**_row(sender), "token": token}


@router.get("/stow-senders/{int:sender_id}", response=schemas.StowSender, summary="Read one STOW-RS sender")
def stow_sender_read(request: HttpRequest, sender_id: int):
    require(request, *VIEW)
    return _row(get_object_or_404(StowSender.objects.select_related("application_entity"), pk=sender_id))


@router.post(
    "/stow-senders/{int:sender_id}/revoke", response=schemas.StowSender, summary="Revoke a STOW-RS sender's token"
)
def stow_sender_revoke(request: HttpRequest, sender_id: int):
    """At once: its next STOW-RS is refused. 409 when it was already revoked."""
    client = require(request, *REVOKE)
    sender = get_object_or_404(StowSender.objects.select_related("application_entity"), pk=sender_id)
    with audit_as(client.actor, request):
        revoked = senders.stow_sender_revoke(sender)
    if not revoked:
        raise Problem(409, f"sender {sender.name!r} was already revoked")
    sender.refresh_from_db()
    return _row(sender)
