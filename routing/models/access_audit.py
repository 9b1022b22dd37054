"""Who may do what, audited however it changes: users, groups, group membership, permissions and
STOW-RS sender tokens, made in the Django admin, the staff UI, a management command or a shell.

They all save through the ORM, so its signals (post_save, post_delete, m2m_changed) are the one
place that sees every change. The receivers only compute the before/after and write an audit
row; who made the change comes from the web request being served (`AuditRequestMiddleware` in
pacslens/middleware.py) or, outside a request, the operating-system user and the command line.
Not seen: bulk `QuerySet.update()` and raw SQL, which nothing in PacsLens uses on these rows
(StowSender.revoke records its own row).
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from django.contrib.auth.models import Group, Permission, User
from django.db import models
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_save
from django.dispatch import receiver
from django.http import HttpRequest

from routing.models.audit import MASK, AuditAction, AuditEntry

_request: ContextVar[HttpRequest | None] = ContextVar("pacslens_audit_request", default=None)
# Who, when it is not the request's logged-in user: an API client (its `api:NAME`).
_actor: ContextVar[str | None] = ContextVar("pacslens_audit_actor", default=None)

# What is recorded of each row: never a password hash or a token hash, only that it changed.
USER_FIELDS = ("username", "first_name", "last_name", "email", "is_active", "is_staff", "is_superuser")
GROUP_FIELDS = ("name",)
STOW_SENDER_FIELDS = ("name", "application_entity_id", "token_hint", "revoked_at")
FIELDS: dict[str, tuple[str, ...]] = {
    "auth.user": USER_FIELDS,
    "auth.group": GROUP_FIELDS,
    "routing.stowsender": STOW_SENDER_FIELDS,
}
# Secrets whose change is recorded as a change, never by value.
SECRET_OF: dict[str, str] = {"auth.user": "password", "routing.stowsender": "token_hash"}


@contextmanager
def audit_request(request: HttpRequest) -> Iterator[None]:
    """Attribute the changes made while serving `request` to its user."""
    token = _request.set(request)
    try:
        yield
    finally:
        _request.reset(token)


@contextmanager
def audit_as(actor: str, request: HttpRequest | None = None) -> Iterator[None]:
    """Attribute the changes made meanwhile to `actor` (an API client: no user is logged in)."""
    actor_token, request_token = _actor.set(actor), _request.set(request)
    try:
        yield
    finally:
        _actor.reset(actor_token)
        _request.reset(request_token)


def current_actor() -> tuple[str, HttpRequest | None]:
    """(who, request): `audit_as`'s actor, else the logged-in user of the request being served,
    else the process's user and command (`root (manage.py createsuperuser)`)."""
    request = _request.get()
    actor = _actor.get()
    if actor is not None:
        return actor, request
    if request is not None:
        user = getattr(request, "user", None)
        return (user.get_username() if user is not None and user.is_authenticated else "anonymous"), request
    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's arbitrary uid)
        who = f"uid {os.getuid()}"
    command = " ".join(os.path.basename(arg) for arg in sys.argv[:2])
    return f"{who} ({command})", None


def access_change_record(*, obj: models.Model, before: dict | None, after: dict | None, detail: str) -> AuditEntry:
    """One `access` audit row for `obj`, attributed to whoever is making the change."""
    who, request = current_actor()
    return AuditEntry.record(
        actor=who,
        action=AuditAction.ACCESS,
        obj=obj,
        object_repr=str(obj),
        before=before,
        after=after,
        detail=detail,
        request=request,
    )


def access_snapshot(obj: models.Model) -> dict:
    label = obj._meta.label_lower
    snapshot = {field: _plain(getattr(obj, field)) for field in FIELDS[label]}
    if label in SECRET_OF:
        snapshot[SECRET_OF[label]] = MASK if getattr(obj, SECRET_OF[label]) else ""
    return snapshot


def _plain(value):
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _audited(sender) -> bool:
    return sender._meta.label_lower in FIELDS


# --- rows: users, groups, STOW-RS senders ------------------------------------------------------


def _remember_before(sender, instance, raw=False, update_fields=None, **kwargs) -> None:
    if raw or not _audited(sender) or _login_only(sender, update_fields):
        return
    previous = sender._default_manager.filter(pk=instance.pk).first() if instance.pk else None
    instance._access_before = access_snapshot(previous) if previous else None
    label = sender._meta.label_lower
    if previous is not None and label in SECRET_OF:
        secret = SECRET_OF[label]
        instance._access_secret_changed = getattr(previous, secret) != getattr(instance, secret)


def _record_save(sender, instance, created, raw=False, update_fields=None, **kwargs) -> None:
    if raw or not _audited(sender) or _login_only(sender, update_fields):
        return
    kind = sender._meta.verbose_name
    after = access_snapshot(instance)
    if created:
        access_change_record(obj=instance, before=None, after=after, detail=f"{kind} created")
        return
    before = getattr(instance, "_access_before", None)
    if getattr(instance, "_access_secret_changed", False):
        secret = SECRET_OF[sender._meta.label_lower]
        after[secret] = f"{MASK} (changed)"
    if before == after:
        return  # saved without a change (an admin "Save" with nothing edited)
    changed = sorted(k for k in after if (before or {}).get(k) != after[k])
    access_change_record(obj=instance, before=before, after=after, detail=f"{kind} changed: {', '.join(changed)}")


def _record_delete(sender, instance, **kwargs) -> None:
    if _audited(sender):
        access_change_record(
            obj=instance, before=access_snapshot(instance), after=None, detail=f"{sender._meta.verbose_name} deleted"
        )


# Connected per audited model, never for every model: a receiver for all senders would also run on
# every Instance the listener records, and would make its raw-SQL insert fall back to the ORM
# (routing/store/records.py takes the ORM's road whenever anyone listens to Instance saves).
# The senders are "app_label.Model" strings, which Django resolves once the model is loaded.
for _label in FIELDS:
    pre_save.connect(_remember_before, sender=_label, dispatch_uid=f"pacslens_access_pre_save:{_label}")
    post_save.connect(_record_save, sender=_label, dispatch_uid=f"pacslens_access_post_save:{_label}")
    post_delete.connect(_record_delete, sender=_label, dispatch_uid=f"pacslens_access_post_delete:{_label}")


def _login_only(sender, update_fields) -> bool:
    # Every login saves the user's last_login: not a change of who may do what.
    return sender is User and update_fields is not None and set(update_fields) <= {"last_login"}


# --- memberships and permissions ---------------------------------------------------------------


def _names(model, pks) -> list[str]:
    if model is Permission:
        rows = Permission.objects.filter(pk__in=pks).select_related("content_type")
        return sorted(f"{p.content_type.app_label}.{p.codename}" for p in rows)
    return sorted(str(obj) for obj in model._default_manager.filter(pk__in=pks))


@receiver(m2m_changed, sender=User.groups.through, dispatch_uid="pacslens_access_user_groups")
@receiver(m2m_changed, sender=User.user_permissions.through, dispatch_uid="pacslens_access_user_permissions")
@receiver(m2m_changed, sender=Group.permissions.through, dispatch_uid="pacslens_access_group_permissions")
def _record_membership(sender, instance, action, reverse, model, pk_set, **kwargs) -> None:
    """A user added to or removed from a group, a permission granted or taken, from either side
    (`user.groups.add(group)` and `group.user_set.add(user)` alike): one row per object changed."""
    if action == "pre_clear":
        # Cleared rows are gone by post_clear: remember them now.
        instance._access_cleared = list(getattr(instance, _relation(sender, reverse)).values_list("pk", flat=True))
        return
    if action not in ("post_add", "post_remove", "post_clear"):
        return
    pks = set(pk_set or ()) if action != "post_clear" else set(getattr(instance, "_access_cleared", []))
    if not pks:
        return
    verb = "added" if action == "post_add" else "removed"
    relation = _relation(sender, reverse)
    if not reverse:
        # instance is the user (or group); the others are groups or permissions.
        now = set(getattr(instance, relation).values_list("pk", flat=True))
        then = now - pks if verb == "added" else now | pks
        field = "groups" if model is Group else "permissions"
        access_change_record(
            obj=instance,
            before={field: _names(model, then)},
            after={field: _names(model, now)},
            detail=f"{field} {verb}: {', '.join(_names(model, pks))}",
        )
        return
    # Reverse (group.user_set.add(user), permission.group_set...): record it on each changed object.
    for other in model._default_manager.filter(pk__in=pks):
        forward = _forward_relation(sender)
        now = set(getattr(other, forward).values_list("pk", flat=True))
        then = now - {instance.pk} if verb == "added" else now | {instance.pk}
        target = type(instance)
        field = "groups" if target is Group else "permissions"
        access_change_record(
            obj=other,
            before={field: _names(target, then)},
            after={field: _names(target, now)},
            detail=f"{field} {verb}: {_names(target, {instance.pk})[0]}",
        )


def _relation(sender, reverse: bool) -> str:
    if sender is User.groups.through:
        return "user_set" if reverse else "groups"
    if sender is User.user_permissions.through:
        return "user_set" if reverse else "user_permissions"
    return "group_set" if reverse else "permissions"


def _forward_relation(sender) -> str:
    return _relation(sender, reverse=False)
