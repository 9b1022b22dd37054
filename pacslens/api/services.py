"""Creating and revoking API clients and tokens, audited: one home for the page and the command."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from pacslens.api.models import ApiClient, ApiToken
from routing.models import AuditAction, AuditEntry


def api_client_create(
    *, name: str, role: str, actor: str, description: str = "", expires_in_days: int | None = None, request=None
) -> tuple[ApiClient, str]:
    """A new client and its first token (returned once). Raises ValidationError on a bad name or role."""
    client = ApiClient(name=name, role=role, description=description, created_by=actor)
    client.full_clean()
    with transaction.atomic():
        client.save()
        AuditEntry.record(
            actor=actor,
            action=AuditAction.CREATE,
            obj=client,
            object_repr=client.name,
            after={"name": client.name, "role": client.role, "description": client.description},
            request=request,
        )
        _, token = api_token_issue(client=client, actor=actor, expires_in_days=expires_in_days, request=request)
    return client, token


def api_token_issue(
    *, client: ApiClient, actor: str, expires_in_days: int | None = None, request=None
) -> tuple[ApiToken, str]:
    """Another token for a client (to rotate: issue, switch the integration over, revoke the old)."""
    if client.revoked_at:
        raise ValidationError("This client is revoked: create a new client.")
    if expires_in_days is not None and expires_in_days < 1:
        raise ValidationError("A token must live at least one day (or leave the expiry empty).")
    expires_at: datetime | None = None
    if expires_in_days is not None:
        expires_at = timezone.now() + timedelta(days=expires_in_days)
    with transaction.atomic():
        row, token = client.token_issue(expires_at=expires_at)
        AuditEntry.record(
            actor=actor,
            action=AuditAction.CREATE,
            obj=row,
            object_repr=f"token {row.token_hint}… of {client.name}",
            detail=f"role {client.role}; expires {expires_at.isoformat() if expires_at else 'never'}",
            request=request,
        )
    return row, token


def api_client_revoke(*, client: ApiClient, actor: str, request=None) -> bool:
    with transaction.atomic():
        revoked = client.revoke()
        if revoked:
            AuditEntry.record(
                actor=actor, action=AuditAction.REVOKE, obj=client, object_repr=client.name, request=request
            )
    return revoked


def api_token_revoke(*, token: ApiToken, actor: str, request=None) -> bool:
    with transaction.atomic():
        revoked = token.revoke()
        if revoked:
            AuditEntry.record(
                actor=actor,
                action=AuditAction.REVOKE,
                obj=token,
                object_repr=f"token {token.token_hint}… of {token.client.name}",
                request=request,
            )
    return revoked
