from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand

from pacslens.site_config.document import config_export


class Command(BaseCommand):
    help = "Write the site's configuration (AE titles, rules, models, endpoints) as one YAML file."

    def add_arguments(self, parser) -> None:
        parser.add_argument("file", nargs="?", help="Output file (default: standard output)")

    def handle(self, *args, file: str | None = None, **options) -> None:
        text = config_export()
        if file:
            Path(file).write_text(text)
            self.stderr.write(f"configuration written to {file}")
        else:
            self.stdout.write(text, ending="")
