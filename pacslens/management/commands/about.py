"""`manage.py about`: which PacsLens this is, and where its state lives.

The version (pacslens/__init__.py), the installation identity every identifier we send derives
from (results/deliver/identity.py), the database (never its password) and the data dir. For a
support ticket, an upgrade log or a check after restoring a backup. (Django's own `version`
command prints Django's version, hence this name.)
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import django
from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import DatabaseError, connection

from pacslens import __version__
from results.deliver.identity import IDENTITY_FILE, identity_file_read
from results.models import Installation


class Command(BaseCommand):
    help = "Print the PacsLens version, the installation identity, the database and the data dir."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--json", action="store_true", help="Machine-readable output")

    def handle(self, *args, **options) -> None:
        data = about_data()
        if options["json"]:
            self.stdout.write(json.dumps(data, indent=2))
            return
        width = max(len(key) for key in data)
        for key, value in data.items():
            self.stdout.write(f"{key.replace('_', ' '):<{width}}  {value if value is not None else '-'}")


def about_data() -> dict[str, str | None]:
    database = settings.DATABASES["default"]
    data_dir = Path(settings.DATA_DIR)
    recorded = identity_file_read(data_dir / IDENTITY_FILE)
    return {
        "version": __version__,
        "installation": _installation(),
        "installation_file": str(recorded) if recorded else None,
        "database": _database_text(database),
        "data_dir": str(data_dir),
        "python": platform.python_version(),
        "django": django.get_version(),
    }


def _installation() -> str | None:
    # Read only: `about` never creates an identity (migrate does), so it is safe on any database.
    try:
        row = Installation.objects.filter(singleton=True).first()
    except DatabaseError:
        return "(database not reachable or not migrated)"
    return str(row.uuid) if row else "(none yet: run manage.py migrate)"


def _database_text(database: dict) -> str:
    vendor = connection.vendor
    if vendor == "sqlite":
        return f"sqlite {database['NAME']}"
    where = f"{database.get('HOST') or 'localhost'}:{database.get('PORT') or 'default port'}"
    return f"{vendor} {database.get('NAME')} on {where} as {database.get('USER') or '-'}"
