"""Benchmark: what outbound event webhooks cost.

A fresh SQLite database (temporary data dir) and a local HTTP receiver (http.server, answers 200).
Timed: (1) `webhook_events_record` inside a transaction, as delivery_record and study_infer call
it, with no subscription and with three; (2) sending: events per second through
`webhooks_send_due` (claim, sign, POST, settle); (3) the due-time timer's look at the outbox
(`outbox_due_at`) once `--history` events were sent. Synthetic data only.

    .venv/bin/python bench/webhooks.py [--events 500] [--history 20000] [--quick]
"""

from __future__ import annotations

import argparse
import http.server
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pacslens.settings")
os.environ["PACSLENS_DATA_DIR"] = tempfile.mkdtemp(prefix="pacslens-bench-webhooks-")  # never the user's var/
os.environ.pop("DATABASE_URL", None)

import django

django.setup()

from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

from results.deliver.webhooks import webhook_events_record, webhooks_send_due
from results.models import AIModel, InferenceResult, WebhookEvent, WebhookSubscription
from results.outbox import outbox_due_at
from routing.models import Study


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--history", type=int, default=20000)
    parser.add_argument("--quick", action="store_true", help="100 events, 2,000 in the history")
    args = parser.parse_args()
    events, history = (100, 2000) if args.quick else (args.events, args.history)
    call_command("migrate", verbosity=0)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"

    model = AIModel.objects.create(name="bench", version="1", file="x.onnx", sha256="0" * 64, manifest={})
    study = Study.objects.create(study_instance_uid="1.2.3.999", state="delivered")
    result = InferenceResult.objects.create(
        study=study, model=model, model_name="bench", model_version="1", model_sha256="0" * 64,
        status="succeeded", score=0.9, flagged=True,
    )  # fmt: skip

    for subscriptions in (0, 3):
        for index in range(subscriptions):
            WebhookSubscription.objects.get_or_create(
                name=f"engine-{index}", defaults={"webhook_url": url, "secret": "s" * 32}
            )
        times = []
        for _ in range(events):
            started = time.perf_counter()
            with transaction.atomic():
                webhook_events_record(event_type="result.flagged", study=study, result=result)
            times.append(time.perf_counter() - started)
        print(
            f"record, {subscriptions} subscription(s): median {statistics.median(times) * 1000:.2f} ms, "
            f"p95 {sorted(times)[int(len(times) * 0.95)] * 1000:.2f} ms per event (in its transaction)"
        )

    pending = WebhookEvent.objects.filter(state="pending").count()
    started = time.perf_counter()
    sent = 0
    while True:
        batch = webhooks_send_due()
        if not batch:
            break
        sent += batch
    elapsed = time.perf_counter() - started
    print(
        f"send: {sent} of {pending} events signed and POSTed in {elapsed:.2f} s ({sent / elapsed:.0f} events/s, one worker)"
    )

    subscription = WebhookSubscription.objects.first()
    WebhookEvent.objects.bulk_create(
        WebhookEvent(
            subscription=subscription, event_type="result.flagged", payload={}, state="sent", sent_at=timezone.now()
        )
        for _ in range(history)
    )
    times = []
    for _ in range(50):
        started = time.perf_counter()
        outbox_due_at(WebhookEvent)
        times.append(time.perf_counter() - started)
    print(
        f"timer look at the outbox with {WebhookEvent.objects.count()} rows: median {statistics.median(times) * 1000:.2f} ms"
    )
    server.shutdown()


if __name__ == "__main__":
    main()
