"""Benchmark: what one run of the alert check costs on a site with a long history.

A fresh SQLite database (temporary data dir) gets `--studies` studies spread over `--days`
days, with one result each (10 % failed, 30 % flagged), 2 % of them with a failed delivery over 5 destinations, 20 poll
sources with failed retrieves, and every condition as a rule (a flagged-share band and a sender
silence per source). Then `alerts_evaluate` is timed: the first run (every condition starts: the
states, events and outbox rows are written) and steady runs (nothing changes, the normal case
every minute). Synthetic data only.

    .venv/bin/python bench/alerts.py [--studies 20000] [--runs 10] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pacslens.settings")
os.environ["PACSLENS_DATA_DIR"] = tempfile.mkdtemp(prefix="pacslens-bench-alerts-")  # never the user's var/
os.environ.pop("DATABASE_URL", None)

import django

django.setup()

from django.core.management import call_command
from django.utils import timezone

from pacslens.ops.alerts.service import alerts_evaluate
from results.models import AIModel, AlertChannel, AlertEvent, AlertRule, Delivery, Destination, InferenceResult
from routing.models import PollSource, Study, StudyRetrieve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--days", type=int, default=90, help="history spread over this many days")
    parser.add_argument("--quick", action="store_true", help="2,000 studies, 3 runs")
    args = parser.parse_args()
    studies, runs = (2000, 3) if args.quick else (args.studies, args.runs)

    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    history(studies, days=args.days)
    print(
        f"history: {studies} studies and results over {args.days} days written in {time.perf_counter() - started:.1f} s"
    )
    for index in range(20):
        AlertRule.objects.create(
            name=f"silent-{index}",
            condition="sender_silent",
            ae_title=f"CT{index}",
            hours=1,
            weekdays="mon,tue,wed,thu,fri,sat,sun",
        )
    AlertRule.objects.create(
        name="band", condition="flag_share", model_name="bench", max_share_percent=20, min_results=10
    )
    AlertChannel.objects.create(name="mail", kind="email", email_to="it@hospital.example")
    print(f"rules: {AlertRule.objects.count()}")

    started = time.perf_counter()
    changed = alerts_evaluate()
    first = time.perf_counter() - started
    print(f"first run: {changed} conditions started, {AlertEvent.objects.count()} events, {first * 1000:.0f} ms")
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        assert alerts_evaluate() == 0
        times.append(time.perf_counter() - started)
    print(
        f"steady run (nothing changes), {runs} runs: median {statistics.median(times) * 1000:.0f} ms, "
        f"max {max(times) * 1000:.0f} ms"
    )


def history(count: int, *, days: int = 90) -> None:
    now = timezone.now()
    step = timezone.timedelta(days=days) / count
    model = AIModel.objects.create(name="bench", version="1", file="x.onnx", sha256="0" * 64, manifest={})
    destinations = [
        Destination.objects.create(
            name=f"ris-{i}", kind="hl7", host="127.0.0.1", port=2575 + i, hl7_message_type="ORU^R01"
        )
        for i in range(5)
    ]
    Study.objects.bulk_create(
        Study(
            study_instance_uid=f"2.25.{i}",
            state="delivered",
            calling_ae_title=f"CT{i % 20}",
            first_received_at=now - step * i,
            last_received_at=now - step * i - timezone.timedelta(hours=3),
        )
        for i in range(count)
    )
    ids = list(Study.objects.values_list("pk", flat=True))
    InferenceResult.objects.bulk_create(
        InferenceResult(
            study_id=pk,
            model=model,
            model_name="bench",
            model_version="1",
            model_sha256=model.sha256,
            status="failed" if n % 10 == 0 else "succeeded",
            flagged=n % 10 in (1, 2, 3),
            created_at=now - step * n,
        )
        for n, pk in enumerate(ids)
    )
    results = dict(InferenceResult.objects.values_list("study_id", "pk"))
    Delivery.objects.bulk_create(
        Delivery(
            result_id=results[pk],
            destination=destinations[n % 5],
            study_id=pk,
            kind="hl7",
            idempotency_key=f"K{n}",
            state="failed" if n % 50 == 0 else "delivered",
        )
        for n, pk in enumerate(ids)
    )
    for index in range(20):
        source = PollSource.objects.create(name=f"src-{index}", kind="dicomweb", dicomweb_url="http://127.0.0.1:9/dw")
        StudyRetrieve.objects.bulk_create(
            StudyRetrieve(source=source, study_instance_uid=f"2.25.9{index}{n}", state="failed" if n < 5 else "done")
            for n in range(200)
        )


if __name__ == "__main__":
    main()
