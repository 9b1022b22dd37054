"""The staff audit log: who did what to which object, when, with the configuration before and after.

Never patient data: objects are named by model and primary key (and, for configuration, by its
name), snapshots hold configuration fields only, with secrets masked. Logins and failed logins
are recorded by the receivers at the bottom, connected when the models load.
"""

from __future__ import annotations

from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.db import models
from django.dispatch import receiver
from django.forms.models import model_to_dict
from django.utils import timezone

from pacslens.client_address import client_address

SECRET_FIELDS = {"secret", "token_hash", "password", "webhook_url", "oauth_client_secret", "access_token"}
MASK = "********"


class AuditAction(models.TextChoices):
    CREATE = "create", "Created"
    UPDATE = "update", "Changed"
    DELETE = "delete", "Deleted"
    ENABLE = "enable", "Enabled"
    DISABLE = "disable", "Disabled"
    REORDER = "reorder", "Reordered"
    TEST = "test", "Tested"
    RETRY = "retry", "Retried"
    DISCARD = "discard", "Discarded"
    RERUN = "rerun", "Re-ran inference"
    LOGIN = "login", "Logged in"
    LOGOUT = "logout", "Logged out"
    LOGIN_FAILED = "login_failed", "Failed login"
    VIEW_AUDIT = "view_audit", "Viewed the triage audit"
    EXPORT_AUDIT = "export_audit", "Exported the triage audit"
    # Users, groups, memberships, permissions, tokens (routing/models/access_audit.py).
    ACCESS = "access", "Changed access"
    REVOKE = "revoke", "Revoked"
    IMPORT = "import", "Imported the site configuration"
    EXPORT = "export", "Exported the site configuration"


class AuditEntry(models.Model):
    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.CharField(max_length=150, help_text="User name (or the name tried, for a failed login)")
    action = models.CharField(max_length=16, choices=AuditAction.choices, db_index=True)
    object_type = models.CharField(max_length=60, blank=True, help_text="app_label.model")
    object_id = models.CharField(max_length=40, blank=True)
    object_repr = models.CharField(max_length=200, blank=True, help_text="A configuration name, never patient data")
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    detail = models.TextField(blank=True, help_text="Counts, filters, reasons; never patient data")
    remote_addr = models.GenericIPAddressField(null=True, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.object_type} {self.object_id}"

    @classmethod
    def record(
        cls,
        *,
        actor: str,
        action: str,
        obj: models.Model | None = None,
        object_repr: str = "",
        before: dict | None = None,
        after: dict | None = None,
        detail: str = "",
        request=None,
    ) -> AuditEntry:
        object_type = object_id = ""
        if obj is not None:
            object_type = obj._meta.label_lower
            object_id = str(obj.pk)
        return cls.objects.create(
            actor=actor[:150],
            action=action,
            object_type=object_type,
            object_id=object_id,
            object_repr=object_repr[:200],
            before=before,
            after=after,
            detail=detail[:2000],
            remote_addr=_remote_addr(request),
        )

    @property
    def changed_fields(self) -> list[tuple[str, object, object]]:
        """(field, before, after) for each field whose value differs."""
        before, after = self.before or {}, self.after or {}
        return [
            (k, _shown(before.get(k)), _shown(after.get(k)))
            for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)
        ]


def config_snapshot(obj: models.Model) -> dict:
    """A JSON-safe dict of a configuration object's own fields, secrets masked."""
    data = model_to_dict(obj)
    snapshot: dict = {}
    for key, value in data.items():
        if key in SECRET_FIELDS:
            snapshot[key] = MASK if value else ""
        elif isinstance(value, list):
            snapshot[key] = sorted(getattr(v, "pk", v) for v in value)
        elif isinstance(value, (str, int, float, bool, dict)) or value is None:
            snapshot[key] = value
        else:
            snapshot[key] = str(value)
    return snapshot


def _shown(value: object) -> object:
    """A snapshot value as staff typed it: a list's items joined, not Python's repr of the list
    (which doubles every backslash of a DICOM multi-value such as HEAD\\BRAIN)."""
    if isinstance(value, list):
        return "; ".join(str(item) for item in value) or "(none)"
    return value


def _remote_addr(request) -> str | None:
    # Behind the site's proxy, the client it forwarded for (PACSLENS_TRUSTED_PROXIES), not the proxy.
    if request is None:
        return None
    return client_address(request) or None


# Login events come from django.contrib.auth's signals: they are the one hook that also covers the
# admin's login page. The receivers only write a row.


@receiver(user_logged_in, dispatch_uid="pacslens_audit_login")
def _audit_login(sender, request, user, **kwargs) -> None:
    AuditEntry.record(actor=user.get_username(), action=AuditAction.LOGIN, request=request)


@receiver(user_logged_out, dispatch_uid="pacslens_audit_logout")
def _audit_logout(sender, request, user, **kwargs) -> None:
    if user is not None:
        AuditEntry.record(actor=user.get_username(), action=AuditAction.LOGOUT, request=request)


@receiver(user_login_failed, dispatch_uid="pacslens_audit_login_failed")
def _audit_login_failed(sender, credentials, request=None, **kwargs) -> None:
    username = str((credentials or {}).get("username", ""))
    AuditEntry.record(actor=username or "(empty)", action=AuditAction.LOGIN_FAILED, request=request)
