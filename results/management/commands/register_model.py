"""`manage.py register_model MANIFEST`: validate a model manifest and its ONNX file, then register it."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from results.inference.manifest import ManifestError
from results.inference.registry import model_register


class Command(BaseCommand):
    help = (
        "Register an ONNX model from its manifest (YAML or JSON; see results/inference/manifest.py). Every bad "
        "field is reported at once. The file is copied under PACSLENS_DATA_DIR/models/."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("manifest", type=Path)

    def handle(self, *args, manifest: Path, **options) -> None:
        try:
            model, created = model_register(manifest_path=manifest)
        except ManifestError as exc:
            raise CommandError(
                f"{manifest}: {len(exc.problems)} problem(s), nothing was registered:\n  "
                + "\n  ".join(f"{field}: {problem}" for field, problem in exc.problems.items())
            ) from None
        verb = "Registered" if created else "Already registered:"
        self.stdout.write(f"{verb} {model} (sha256 {model.sha256[:12]}…, file {model.file})")
        if model.demonstration:
            self.stdout.write("This is a demonstration model: NOT FOR CLINICAL USE.")
