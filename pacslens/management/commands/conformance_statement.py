"""`manage.py conformance_statement [--format md|html] [--output FILE]`: the DICOM conformance statement."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand

from pacslens.ops.conformance import conformance_build


class Command(BaseCommand):
    help = "Print the DICOM conformance statement generated from the running configuration."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--format", choices=["md", "html"], default="md")
        parser.add_argument("--output", help="Write to this file instead of standard output")

    def handle(self, *args, format: str = "md", output: str | None = None, **options) -> None:
        statement = conformance_build()
        text = statement.as_html() if format == "html" else statement.as_markdown()
        if output:
            Path(output).write_text(text + "\n", encoding="utf-8")
            self.stdout.write(f"written to {output}")
        else:
            self.stdout.write(text)
