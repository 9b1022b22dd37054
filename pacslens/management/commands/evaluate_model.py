"""Evaluate a registered model on a generated case mix or a folder of labelled studies."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pacslens.evaluation import Outcome, case_mix, evaluate, folder_cases, report_lines
from results.inference.runtime import ModelFileError
from results.models import AIModel


class Command(BaseCommand):
    help = (
        "Run a registered model on labelled studies exactly as the pipeline does and print sensitivity, "
        "specificity, AUC and a confusion table, overall and per condition, plus time per study. "
        "Generates a seeded mix of synthetic head CTs (make_demo_study), or reads --folder DIR with a CSV "
        "(StudyInstanceUID,label). Nothing is stored."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="the model's name")
        parser.add_argument(
            "--model-version", dest="model_version", default=None, help="default: the newest registered"
        )
        parser.add_argument("--cases", type=int, default=200, help="generated studies (default 200, half positive)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the generated mix (default 0)")
        parser.add_argument("--folder", type=Path, default=None, help="evaluate the DICOM files under DIR instead")
        parser.add_argument(
            "--labels", type=Path, default=None, help="the CSV of StudyInstanceUID,label (default DIR/labels.csv)"
        )
        parser.add_argument("--quiet", action="store_true", help="no progress line per study")
        parser.add_argument(
            "--cases-list", action="store_true", help="also print every study: label, score, conditions"
        )

    def handle(self, *args, **options) -> None:
        models = AIModel.objects.filter(name=options["name"])
        if options["model_version"]:
            models = models.filter(version=options["model_version"])
        model = models.order_by("-registered_at", "-id").first()
        if model is None:
            known = ", ".join(sorted({f"{m.name} {m.version}" for m in AIModel.objects.all()})) or "none"
            raise CommandError(
                f"no registered model {options['name']} {options['model_version'] or ''}".rstrip()
                + f" (registered: {known})"
            )
        if options["folder"] is not None:
            labels = options["labels"] or options["folder"] / "labels.csv"
            if not options["folder"].is_dir() or not labels.is_file():
                raise CommandError(f"--folder needs a directory and a labels CSV ({labels} not found)")
            try:
                cases = folder_cases(folder=options["folder"], labels_csv=labels)
            except (OSError, ValueError) as exc:
                raise CommandError(str(exc)) from None
        else:
            if not 1 <= options["cases"] <= 100000:
                raise CommandError("--cases must be between 1 and 100000")
            cases = case_mix(cases=options["cases"], seed=options["seed"])
        started = time.perf_counter()

        def progress(number: int, outcome: Outcome) -> None:
            if options["quiet"]:
                return
            verdict = "error" if outcome.error else ("flagged" if outcome.flagged else "not flagged")
            truth = "lesion" if outcome.label else "clean"
            score = "-" if outcome.score is None else f"{outcome.score:.3f}"
            sys.stderr.write(f"\r{number}/{len(cases)} {truth}: {verdict} (score {score})      ")
            sys.stderr.flush()

        try:
            outcomes = evaluate(model=model, cases=cases, progress=progress)
        except ModelFileError as exc:
            raise CommandError(str(exc)) from None
        if not options["quiet"]:
            sys.stderr.write("\n")
        if options["cases_list"]:
            for number, outcome in enumerate(outcomes, start=1):
                score = "-" if outcome.score is None else f"{outcome.score:.3f}"
                wrong = " WRONG" if outcome.score is not None and outcome.flagged != outcome.label else ""
                conditions = ", ".join(f"{k} {v}" for k, v in outcome.conditions.items())
                self.stdout.write(
                    f"{number:4d} {'lesion' if outcome.label else 'clean '} score {score}{wrong}  {conditions}"
                    + (f"  error: {outcome.error}" if outcome.error else "")
                )
            self.stdout.write("")
        for line in report_lines(model=model, outcomes=outcomes):
            self.stdout.write(line)
        self.stdout.write(f"Total {time.perf_counter() - started:.0f} s including generating the studies")
