"""`manage.py study_status STUDY_UID [--json]` for support work from a shell.

The serializer is pacslens/ops/study_status.py: the --json form is stable, its keys documented in
the README and only ever added to.
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from pacslens.ops.study_status import study_status_data, study_status_text
from routing.models import Study


class Command(BaseCommand):
    help = "Show a study's state, counts, sender and timeline."

    def add_arguments(self, parser) -> None:
        parser.add_argument("study_uid", help="Study Instance UID (or the internal id)")
        parser.add_argument("--json", action="store_true", help="Machine-readable output (stable keys)")

    def handle(self, *args, study_uid: str, **options) -> None:
        study = Study.objects.by_uid_or_pk(study_uid)
        if study is None:
            raise CommandError(f"no study with Study Instance UID {study_uid}")
        data = study_status_data(study)
        if options["json"]:
            self.stdout.write(json.dumps(data, indent=2))
            return
        self.stdout.write(study_status_text(data))
