"""`manage.py stow_token create NAME [--ae AE_TITLE] | revoke NAME | list`: STOW-RS sender tokens.

A token is printed once, at creation; only its SHA-256 is kept. To replace a token, revoke
the sender and create it again under a new name (names stay unique for the audit trail).
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from routing.models import StowSender
from routing.stow_senders import StowSenderExists, stow_sender_create, stow_sender_revoke


class Command(BaseCommand):
    help = "Create, revoke or list the bearer tokens of systems that STOW-RS to /dicomweb/studies."

    def add_arguments(self, parser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="New sender; prints its token once")
        create.add_argument("name", help="Sender name (max 16 characters, recorded as the calling AE title)")
        create.add_argument("--ae", dest="ae_title", default="", help="Link to this AE (its quiet period, rules)")
        revoke = sub.add_parser("revoke", help="Revoke a sender's token at once")
        revoke.add_argument("name")
        sub.add_parser("list", help="Senders, token hints and last use (never the tokens)")

    def handle(self, *args, **options) -> None:
        action = options["action"]
        if action == "create":
            self.create(options["name"], options["ae_title"])
        elif action == "revoke":
            self.revoke(options["name"])
        else:
            self.list()

    def create(self, name: str, ae_title: str) -> None:
        try:
            _, token = stow_sender_create(name=name, ae_title=ae_title)
        except StowSenderExists as exc:
            raise CommandError(str(exc)) from None
        except ValidationError as exc:
            if list(exc.message_dict) == ["ae_title"]:
                raise CommandError(exc.message_dict["ae_title"][0]) from None
            raise CommandError("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from None
        self.stderr.write(f"Sender {name} created. Its token (shown only now):")
        self.stdout.write(token)

    def revoke(self, name: str) -> None:
        sender = StowSender.objects.filter(name=name).first()
        if sender is None:
            raise CommandError(f"no sender named {name!r}")
        if not stow_sender_revoke(sender):
            raise CommandError(f"sender {name!r} was already revoked")
        self.stdout.write(f"Sender {name} revoked.")

    def list(self) -> None:
        for sender in StowSender.objects.all():
            state = f"revoked {sender.revoked_at:%Y-%m-%d %H:%M}" if sender.revoked_at else "active"
            used = f"{sender.last_used_at:%Y-%m-%d %H:%M}" if sender.last_used_at else "never"
            self.stdout.write(f"{sender.name:16} {sender.token_hint}…  {state:24} last used {used}")
