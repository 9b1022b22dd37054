"""`manage.py rerun_inference STUDY_UID`: route and infer a finished study again (new results supersede)."""

from __future__ import annotations

import getpass

from django.core.management.base import BaseCommand, CommandError

from routing.completion import RERUNNABLE, study_request_rerun
from routing.models import Study


class Command(BaseCommand):
    help = "Re-route and re-infer a finished study; the new results supersede the current ones."

    def add_arguments(self, parser) -> None:
        parser.add_argument("study_uid", help="Study Instance UID (or the internal id)")

    def handle(self, *args, study_uid: str, **options) -> None:
        study = Study.objects.by_uid_or_pk(study_uid)
        if study is None:
            raise CommandError(f"no study with Study Instance UID {study_uid}")
        if not study_request_rerun(study=study, actor=f"{getpass.getuser()} (command line)"):
            raise CommandError(f"study {study.pk} is {study.state}; a re-run starts from {', '.join(RERUNNABLE)} only")
        self.stdout.write(f"study {study.pk} queued for routing and inference (workers pick it up)")
