"""`manage.py secrets_rotate`: re-encrypt every stored destination secret with the newest key.

Run it after putting a new key first in PACSLENS_SECRETS_KEY (`new,old`); once it reports no
unreadable secret, the old key can be dropped. Secrets no configured key decrypts are left as
they are and counted: they need the old key back, or the secret entered again.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand
from django.db import transaction

from results.models import Destination


class Command(BaseCommand):
    help = "Re-encrypt stored destination secrets with the newest key of PACSLENS_SECRETS_KEY."

    def handle(self, *args, **options) -> None:
        rotated, unreadable = 0, []
        with transaction.atomic():
            for destination in Destination.objects.exclude(secret="").order_by("name"):
                if destination.secret_unreadable:
                    unreadable.append(destination.name)
                    continue
                destination.save(update_fields=["secret"])  # sealed again, with the newest key
                rotated += 1
        self.stdout.write(f"{rotated} secret(s) re-encrypted with the newest key")
        if unreadable:
            self.stdout.write(f"{len(unreadable)} cannot be decrypted with any configured key: {', '.join(unreadable)}")
