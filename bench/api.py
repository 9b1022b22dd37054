"""Benchmark: the automation API under gunicorn (one worker, as the tests run it) on a site with
many studies.

1. Latency (p50/p95 ms) of the first page of GET /api/v1/studies (50 rows), of a filtered page
   (flag=yes, today), of the cursor 100 pages deep (fewer with --quick), and of GET /api/v1/studies/{id}.
2. Walking every study with the cursor: pages/s and studies/s.

    .venv/bin/python bench/api.py [--quick] [--studies 20000] [--requests 200]

Results go to stdout and bench/out/api.json. Everything runs in a temporary directory with its
own SQLite database; the user's var/ is never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WORK = Path(tempfile.mkdtemp(prefix="pacslens-bench-api-"))
os.environ["PACSLENS_DATA_DIR"] = str(WORK / "data")  # never the user's var/
os.environ["DJANGO_SETTINGS_MODULE"] = "pacslens.settings"
os.environ.setdefault("PACSLENS_LOG_LEVEL", "WARNING")

import django

django.setup()

import requests
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from pacslens.api.services import api_client_create
from results.models import InferenceResult
from routing.models import Series, Study
from tests.support.factories import make_model
from tests.support.web import gunicorn_run


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2000 studies, 50 requests")
    parser.add_argument("--studies", type=int, default=20000)
    parser.add_argument("--requests", type=int, default=200, help="requests per latency figure")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.requests = 2000, 50
    Path(settings.DATA_DIR).mkdir(parents=True, exist_ok=True)
    call_command("migrate", interactive=False, verbosity=0)
    started = time.perf_counter()
    _studies(args.studies)
    print(f"{args.studies} studies (every 10th flagged) made in {time.perf_counter() - started:.1f} s")
    _, token = api_client_create(name="bench", role="informaticist", actor="bench")
    figures: dict[str, object] = {"studies": args.studies}
    with gunicorn_run(data_dir=Path(settings.DATA_DIR), database=settings.DATABASES["default"]) as url:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        api = f"{url}/api/v1"
        depth = min(100, args.studies // 50 - 1)
        deep = _cursor_after(session, api, pages=depth)
        some_id = Study.objects.order_by("?").values_list("pk", flat=True).first()
        cases = {
            "first page (50)": (f"{api}/studies", {"limit": 50}),
            "flagged today (50)": (f"{api}/studies", {"limit": 50, "flag": "yes", "received_from": _today()}),
            f"page {depth + 1} (50)": (f"{api}/studies", {"limit": 50, "cursor": deep}),
            "one study": (f"{api}/studies/{some_id}", {}),
        }
        for name, (address, params) in cases.items():
            session.get(address, params=params, timeout=60).raise_for_status()  # warm
            samples = []
            for _ in range(args.requests):
                t0 = time.perf_counter()
                session.get(address, params=params, timeout=60).raise_for_status()
                samples.append((time.perf_counter() - t0) * 1000)
            samples.sort()
            p50, p95 = statistics.median(samples), samples[int(0.95 * (len(samples) - 1))]
            figures[name] = {"p50_ms": round(p50, 1), "p95_ms": round(p95, 1)}
            print(f"{name:20} p50 {p50:7.1f} ms   p95 {p95:7.1f} ms   ({args.requests} requests)")
        t0 = time.perf_counter()
        pages = rows = 0
        params: dict[str, object] = {"limit": 200}
        while True:
            body = session.get(f"{api}/studies", params=params, timeout=60).json()
            pages, rows = pages + 1, rows + len(body["items"])
            if not body["next_cursor"]:
                break
            params["cursor"] = body["next_cursor"]
        elapsed = time.perf_counter() - t0
        assert rows == args.studies, (rows, args.studies)
        figures["walk"] = {"pages": pages, "seconds": round(elapsed, 2), "studies_per_s": round(rows / elapsed)}
        print(f"walk of every study: {pages} pages of 200 in {elapsed:.1f} s ({rows / elapsed:.0f} studies/s)")
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "api.json").write_text(json.dumps(figures, indent=2))
    return 0


def _studies(count: int) -> None:
    now = timezone.now()
    model = make_model()
    rows = [
        Study(
            study_instance_uid=f"2.25.{uuid.uuid4().int}",
            state="delivered",
            accession_number=f"BENCH{i:07d}",
            modalities="CT",
            calling_ae_title="MODALITY1",
            called_ae_title="PACSLENS",
            first_received_at=now - timedelta(seconds=count - i),
            last_received_at=now - timedelta(seconds=count - i),
        )
        for i in range(count)
    ]
    Study.objects.bulk_create(rows, batch_size=1000)
    studies = list(Study.objects.order_by("pk"))
    Series.objects.bulk_create(
        [Series(study=s, series_instance_uid=s.study_instance_uid + ".1", modality="CT") for s in studies],
        batch_size=1000,
    )
    InferenceResult.objects.bulk_create(
        [
            InferenceResult(
                study=s,
                model=model,
                model_name=model.name,
                model_version=model.version,
                model_sha256=model.sha256,
                status="succeeded",
                score=0.9 if i % 10 == 0 else 0.1,
                flagged=i % 10 == 0,
            )
            for i, s in enumerate(studies)
        ],
        batch_size=1000,
    )


def _cursor_after(session: requests.Session, api: str, *, pages: int) -> str:
    params: dict[str, object] = {"limit": 50}
    for _ in range(pages):
        params["cursor"] = session.get(f"{api}/studies", params=params, timeout=60).json()["next_cursor"]
    return str(params["cursor"])


def _today() -> str:
    return timezone.now().date().isoformat()


if __name__ == "__main__":
    sys.exit(main())
