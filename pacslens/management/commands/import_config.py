from __future__ import annotations

import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from pacslens.site_config.document import ConfigError, config_import, config_warnings


class Command(BaseCommand):
    help = "Read a configuration YAML file. Validates everything first; any error changes nothing."

    def add_arguments(self, parser) -> None:
        parser.add_argument("file", help="YAML file, or - for standard input")
        parser.add_argument("--prune", action="store_true", help="Delete entries that are not in the file")
        parser.add_argument("--dry-run", action="store_true", help="Validate and report, change nothing")

    def handle(self, *args, file: str, prune: bool, dry_run: bool, **options) -> None:
        try:
            text = sys.stdin.read() if file == "-" else Path(file).read_text()
        except OSError as exc:
            raise CommandError(f"cannot read {file}: {exc.strerror}") from None
        try:
            summary = config_import(text, prune=prune, dry_run=dry_run)
        except ConfigError as exc:
            raise CommandError(
                f"{file}: {len(exc.problems)} problem(s), nothing was changed:\n  " + "\n  ".join(exc.problems)
            ) from None
        for warning in config_warnings(text):
            self.stderr.write(f"warning: {warning}")
        for section, counts in summary.items():
            self.stdout.write(
                f"{section}: {counts['created']} created, {counts['updated']} updated, {counts['deleted']} deleted"
            )
        if dry_run:
            self.stdout.write("dry run: nothing was changed")
