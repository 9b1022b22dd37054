"""`manage.py backfill SOURCE --from DATE --to DATE [--modality CT] [--dry-run]`.

Pulls a historical range from a poll source for initialisation: one Study Date at a time,
throttled by the source's limits, resumable (Ctrl-C, then run the same command again), each
study retrieved once. Prints a progress bar and a summary; never patient data.
"""

from __future__ import annotations

import signal
import sys
from datetime import date

from django.core.management.base import BaseCommand, CommandError

from routing.models import PollSource
from routing.pull.backfill import BackfillProgress, backfill_run, pending_for

BAR_WIDTH = 30


class Command(BaseCommand):
    help = "Pull a historical date range of studies from a poll source (resumable)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("source", help="Poll source name")
        parser.add_argument("--from", dest="date_from", required=True, help="First Study Date, YYYY-MM-DD")
        parser.add_argument("--to", dest="date_to", required=True, help="Last Study Date, YYYY-MM-DD")
        parser.add_argument("--modality", default="", help="Only studies with this modality (e.g. CT)")
        parser.add_argument("--dry-run", action="store_true", help="Query and count only; retrieve nothing")

    def handle(self, *args, **options) -> None:
        source = PollSource.objects.select_related("pacs").filter(name=options["source"]).first()
        if source is None:
            names = ", ".join(PollSource.objects.values_list("name", flat=True)) or "none configured"
            raise CommandError(f"no poll source {options['source']!r} (known: {names})")
        date_from, date_to = _date(options["date_from"], "--from"), _date(options["date_to"], "--to")
        if date_to < date_from:
            raise CommandError("--to is before --from")
        self.shutdown = False
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            progress = backfill_run(
                source=source,
                date_from=date_from,
                date_to=date_to,
                modality=options["modality"].upper(),
                dry_run=options["dry_run"],
                should_stop=lambda: self.shutdown,
                report=self._report,
            )
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self._summary(progress, source, dry_run=options["dry_run"])

    def _stop(self, signum, frame) -> None:
        self.shutdown = True
        self.stderr.write("\nStopping after the current retrieve; run the same command again to resume.")

    def _report(self, progress: BackfillProgress) -> None:
        done = int(BAR_WIDTH * progress.days_done / max(progress.days_total, 1))
        line = (
            f"[{'#' * done}{'.' * (BAR_WIDTH - done)}] {progress.days_done}/{progress.days_total} days, "
            f"{progress.studies_found} found, {progress.retrieved} retrieved, {progress.failed} failed"
        )
        if sys.stderr.isatty():
            self.stderr.write("\r" + line, ending="")
        else:
            self.stderr.write(line)

    def _summary(self, progress: BackfillProgress, source: PollSource, *, dry_run: bool) -> None:
        if sys.stderr.isatty():
            self.stderr.write("")
        verb = "would consider" if dry_run else "found"
        self.stdout.write(
            f"Backfill of {source.name}: {progress.days_done}/{progress.days_total} days queried, {verb} "
            f"{progress.studies_found} studies ({progress.studies_new} new), retrieved {progress.retrieved}, "
            f"failed {progress.failed}."
        )
        if not dry_run:
            pending = pending_for(source)
            if pending:
                self.stdout.write(
                    f"{pending} retrieve(s) of this source are waiting for a retry (the scheduled polls "
                    "retry them; see their last error in the study retrieves)."
                )
        if progress.error:
            raise CommandError(f"stopped: {progress.error}. Fix it and run the same command again to resume.")
        if progress.interrupted:
            self.stdout.write("Interrupted: run the same command again to resume.")


def _date(value: str, option: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise CommandError(f"{option} {value!r} is not a date (YYYY-MM-DD)") from None
