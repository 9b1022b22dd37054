"""`manage.py deliver STUDY_UID [--destination NAME] [--wait SECONDS]`: re-send by hand.

Re-queues the deliveries of the study's current results (failed or delivered alike, with
their original idempotency keys, so receivers keep one copy), creates missing ones for
destinations routed since, then waits for the workers and reports each outcome.
"""

from __future__ import annotations

import time

from django.core.management.base import BaseCommand, CommandError

from results.deliver.ledger import study_redeliver
from results.models import Delivery, DeliveryState, Destination, ResultStatus
from routing.models import Study


class Command(BaseCommand):
    help = "Re-queue a study's result deliveries and report what happened."

    def add_arguments(self, parser) -> None:
        parser.add_argument("study_uid")
        parser.add_argument("--destination", help="Only this destination (its name)")
        parser.add_argument("--wait", type=float, default=60.0, help="Seconds to wait for the workers (0: don't)")

    def handle(self, *args, study_uid: str, destination: str | None, wait: float, **options) -> None:
        study = Study.objects.filter(study_instance_uid=study_uid).first()
        if study is None:
            raise CommandError(f"no study with Study Instance UID {study_uid}")
        if destination and not Destination.objects.filter(name=destination).exists():
            names = ", ".join(Destination.objects.values_list("name", flat=True)) or "none configured"
            raise CommandError(f"no destination named {destination!r} (destinations: {names})")
        if not study.inference_results.current().live().filter(status=ResultStatus.SUCCEEDED).exists():
            raise CommandError(f"study {study_uid} has no successful inference result to deliver (state {study.state})")
        requeued, ids = study_redeliver(study=study, destination_name=destination, actor="manage.py deliver")
        self.stdout.write(f"{requeued} delivery(ies) re-queued, {len(ids)} in all")
        if not ids:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not Delivery.objects.filter(
                pk__in=ids, state__in=[DeliveryState.PENDING, DeliveryState.IN_FLIGHT]
            ).exists():
                break
            time.sleep(0.5)
        for row in Delivery.objects.filter(pk__in=ids).select_related("destination").order_by("pk"):
            error = f"  {row.last_error}" if row.state != DeliveryState.DELIVERED and row.last_error else ""
            self.stdout.write(
                f"{row.destination.name:<20} {row.state:<10} attempts {row.attempts}  key {row.idempotency_key}{error}"
            )
