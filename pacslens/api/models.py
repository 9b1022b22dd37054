"""API clients and their bearer tokens.

A client is a system (an integration engine, a script) with one role: one of the staff groups, so
a client may do through the API exactly what a person in that group may do in the UI. Tokens are
shown once and kept as a SHA-256 hash (256 random bits: nothing to brute-force); each has an
optional expiry, can be revoked, and records when it was last used.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.contrib.auth.models import Group
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

from routing.models.pull import token_hash

# last_used_at is written at most this often per token: a busy integration engine must not turn
# every read into a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class ApiRole(models.TextChoices):
    PACS_ADMINISTRATOR = "pacs_administrator", "PACS administrator"
    INFORMATICIST = "informaticist", "Informaticist"
    AUDITOR = "auditor", "Auditor (read-only)"


# The staff group whose permissions a role carries (the PACS administrators and Informaticists
# groups come from routing's migration 0004, Auditors from this app's 0002).
ROLE_GROUPS = {
    ApiRole.PACS_ADMINISTRATOR: "PACS administrators",
    ApiRole.INFORMATICIST: "Informaticists",
    ApiRole.AUDITOR: "Auditors",
}


class ApiClient(models.Model):
    name = models.CharField(
        max_length=64,
        unique=True,
        validators=[
            RegexValidator(
                r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                "Letters, digits, dot, dash and underscore; start with a letter or digit.",
            )
        ],
        help_text="Recorded as api:NAME in the audit log",
    )
    role = models.CharField(max_length=20, choices=ApiRole.choices)
    description = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.CharField(max_length=150)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        permissions = [("view_triage_audit", "Can read the triage audit through the API")]

    def __str__(self) -> str:
        return self.name

    @property
    def actor(self) -> str:
        """The audit log's actor for what this client does."""
        return f"api:{self.name}"

    def permissions(self) -> set[str]:
        """`app_label.codename` of every permission of the role's group (as User.get_all_permissions)."""
        rows = Group.objects.filter(name=ROLE_GROUPS[ApiRole(self.role)]).values_list(
            "permissions__content_type__app_label", "permissions__codename"
        )
        return {f"{app}.{codename}" for app, codename in rows if codename}

    def token_issue(self, *, expires_at: datetime | None) -> tuple[ApiToken, str]:
        """A new token for this client. The token is returned once: only its hash is kept."""
        token = ApiToken.PREFIX + secrets.token_urlsafe(32)
        row = ApiToken.objects.create(
            client=self,
            token_hash=token_hash(token),
            token_hint=token[: len(ApiToken.PREFIX) + 4],
            expires_at=expires_at,
        )
        return row, token

    def revoke(self, *, now: datetime | None = None) -> bool:
        """Revoke the client and every token it has. False if it was already revoked."""
        now = now or timezone.now()
        self.tokens.filter(revoked_at=None).update(revoked_at=now)
        revoked = bool(ApiClient.objects.filter(pk=self.pk, revoked_at=None).update(revoked_at=now))
        self.revoked_at = self.revoked_at or now
        return revoked


class ApiToken(models.Model):
    PREFIX = "plapi_"

    client = models.ForeignKey(ApiClient, on_delete=models.CASCADE, related_name="tokens")
    token_hash = models.CharField(max_length=64, unique=True)
    token_hint = models.CharField(max_length=16, help_text="First characters of the token, to tell tokens apart")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Empty: does not expire")
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.token_hint}… of {self.client_id}"

    @classmethod
    def authenticate(cls, token: str, *, now: datetime | None = None) -> ApiToken | None:
        """The live token with this secret (its client not revoked, not expired), else None."""
        if not token.startswith(cls.PREFIX):
            return None
        now = now or timezone.now()
        row = (
            cls.objects.select_related("client")
            .filter(token_hash=token_hash(token), revoked_at=None, client__revoked_at=None)
            .filter(models.Q(expires_at=None) | models.Q(expires_at__gt=now))
            .first()
        )
        if row is not None and (row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION):
            cls.objects.filter(pk=row.pk).update(last_used_at=now)
            row.last_used_at = now
        return row

    def revoke(self, *, now: datetime | None = None) -> bool:
        return bool(ApiToken.objects.filter(pk=self.pk, revoked_at=None).update(revoked_at=now or timezone.now()))

    @property
    def status(self) -> str:
        if self.revoked_at or self.client.revoked_at:
            return "revoked"
        if self.expires_at and self.expires_at <= timezone.now():
            return "expired"
        return "active"


def clients_with_tokens() -> Iterable[ApiClient]:
    return ApiClient.objects.prefetch_related("tokens")
