"""`manage.py setup_site`: idempotent first-run and upgrade steps, run by `make run`.

Makes the data dir, writes the installation identity into it (results/deliver/identity.py), ensures a staff login exists (a generated password printed once — there
is never a fixed default), and ensures the periodic sweeps are scheduled.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.utils.crypto import get_random_string

from pacslens.ops.schedules import schedules_ensure
from results.deliver.identity import identity_file_sync, installation_row
from results.inference.demo_model import ensure_demo_setup
from routing.models import ApplicationEntity
from routing.store.spool import incoming_dir


class Command(BaseCommand):
    help = "Prepare the data dir, a first staff login, schedules and the demonstration setup."

    def handle(self, *args, **options) -> None:
        incoming_dir()
        (settings.DATA_DIR / "instances").mkdir(parents=True, exist_ok=True)
        self.stdout.write(identity_file_sync(installation_row()))
        self.ensure_admin()
        self.ensure_demo_sender()
        names = schedules_ensure()
        self.stdout.write(f"schedules: {', '.join(n.removeprefix('pacslens:') for n in names)}")
        self.stdout.write(ensure_demo_setup())

    def ensure_demo_sender(self) -> None:
        """On a fresh site, allow one sender for the README tour: DEMO_MODALITY, from this machine only."""
        if ApplicationEntity.objects.exists():
            return
        ApplicationEntity.objects.create(
            ae_title="DEMO_MODALITY",
            host="127.0.0.1",
            check_peer_ip=True,
            description="Demonstration sender for the README tour (localhost only); delete on a real site",
        )
        self.stdout.write("allowed calling AE DEMO_MODALITY from 127.0.0.1 (README tour)")

    def ensure_admin(self) -> None:
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            return
        password = get_random_string(20)
        User.objects.create_superuser(username="admin", email="", password=password)
        bar = "=" * 64
        self.stdout.write(
            f"{bar}\nCreated the first staff login (shown once, store it now):\n"
            f"  user: admin\n  password: {password}\n"
            f"Change it at /admin/password_change/ after logging in.\n{bar}"
        )
