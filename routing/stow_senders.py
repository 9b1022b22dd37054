"""Creating and revoking STOW-RS senders: one home for `manage.py stow_token` and the API.

A token is returned once, at creation; only its SHA-256 is kept. The audit rows are written by
the access audit (routing/models/access_audit.py) for whoever is making the change.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError

from routing.models import ApplicationEntity, StowSender


class StowSenderExists(ValueError):
    pass


def stow_sender_create(*, name: str, ae_title: str = "") -> tuple[StowSender, str]:
    """A new sender and its token. Raises StowSenderExists for a name in use (revoked ones
    included: names stay unique for the audit trail), ValidationError ({field: [message]}) for
    a bad name or an unknown AE title."""
    ae = None
    if ae_title:
        ae = ApplicationEntity.objects.filter(ae_title=ae_title).first()
        if ae is None:
            raise ValidationError({"ae_title": [f"no AE title {ae_title!r}; create it first (UI or import_config)"]})
    if StowSender.objects.filter(name=name).exists():
        raise StowSenderExists(f"a sender named {name!r} exists; revoke it and choose a new name")
    return StowSender.create_with_token(name=name, application_entity=ae)


def stow_sender_revoke(sender: StowSender) -> bool:
    """Revoke at once; False when it was already revoked."""
    return sender.revoke()
