"""`manage.py secrets_rotate`: re-encrypt every stored secret with the newest key.

Destination passwords and tokens, and the OAuth client secrets of destinations and poll sources.
Run it after putting a new key first in PACSLENS_SECRETS_KEY (`new,old`); once it reports no
unreadable secret, the old key can be dropped. Secrets no configured key decrypts are left as
they are and counted: they need the old key back, or the secret entered again. Cached OAuth
access tokens are dropped (the next request fetches a new one).
"""

from __future__ import annotations

from django.core.management.base import BaseCommand
from django.db import transaction

from results.models import Destination
from routing.models import OAuthToken, PollSource
from routing.models.sealed import UnreadableSecret


class Command(BaseCommand):
    help = "Re-encrypt stored secrets (destination passwords and tokens, OAuth client secrets) with the newest key."

    def handle(self, *args, **options) -> None:
        rotated, unreadable = 0, []
        with transaction.atomic():
            rows: list[Destination | PollSource] = [
                *Destination.objects.order_by("name"),
                *PollSource.objects.order_by("name"),
            ]
            for row in rows:
                fields = [f for f in ("secret", "oauth_client_secret") if getattr(row, f, "")]
                lost = [
                    f for f in ("secret", "oauth_client_secret") if isinstance(getattr(row, f, ""), UnreadableSecret)
                ]
                unreadable += [f"{row.name} ({f})" if f != "secret" else row.name for f in lost]
                if fields:
                    row.save(update_fields=fields)  # sealed again, with the newest key
                    rotated += len(fields)
            OAuthToken.objects.all().delete()
        self.stdout.write(f"{rotated} secret(s) re-encrypted with the newest key")
        if unreadable:
            self.stdout.write(f"{len(unreadable)} cannot be decrypted with any configured key: {', '.join(unreadable)}")
