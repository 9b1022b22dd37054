"""No patient data anywhere but the study rows: the whole pipeline, failures included.

A study whose patient name and ID are marker strings goes through real processes exactly as
`make run` starts them — storescu → listener → completion → routing → inference → deliveries
to a live RIS (MLLP, AA), a RIS that answers AE *echoing the patient's name back* (as some
interface engines do), and a dead PACS. Every log line (all loggers at DEBUG, pynetdicom and
django-q included), both log formats, every django-q2 table (broker payloads decoded, task
args/kwargs/results, schedules), every free-text column a failure writes, every webhook body a
real HTTP receiver was sent (flagged result, failed deliveries), `/metrics`, `/healthz` and
`study_status --json` are then searched for the markers.
"""

from __future__ import annotations

import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator

import pydicom
import pytest

from pacslens.demo_study import demo_study_write
from tests.support.listener_proc import PYTHON, REPO
from tests.support.mllp import mllp_frame_read
from tests.support.net import free_port

pytestmark = pytest.mark.interop

PATIENT_NAME = "ZZPHIFAMILY^QQPHIGIVEN"
PATIENT_ID = "XXPHIID4711"
BIRTH_DATE = "19230417"
MARKERS = ["ZZPHIFAMILY", "QQPHIGIVEN", "XXPHIID4711", BIRTH_DATE]
DEMO_RULE = "Demo: CT head to the demonstration model"

SITE_YAML = """\
pacslens_config: 1
ae_titles:
- {ae_title: DEAD_PACS, host: 127.0.0.1, port: DEAD_PORT, may_send: false, receives_results: true}
destinations:
- {name: ris-live, kind: hl7, host: 127.0.0.1, port: LIVE_PORT, hl7_message_type: ORU^R01, rules: [DEMO_RULE]}
- {name: ris-echo, kind: hl7, host: 127.0.0.1, port: ECHO_PORT, hl7_message_type: ORM^O01, on_ack_error: fail,
   rules: [DEMO_RULE]}
- {name: pacs-dead, kind: dicom, application_entity: DEAD_PACS, max_attempts: 1, timeout_seconds: 2,
   rules: [DEMO_RULE]}
""".replace("DEMO_RULE", repr(DEMO_RULE))

# Run in the site's environment: everything a queue or failure path may have written, decoded.
DUMP_SCRIPT = """
import django
django.setup()
from django.test import Client
from django_q.models import OrmQ, Schedule, Task
from django_q.signing import SignedPackage
from prometheus_client import generate_latest
from pacslens.ops.metrics import registry
from results.models import AlertEvent, Delivery, DeliveryAttempt, InferenceResult, WebhookEvent
from routing.models import Heartbeat, OpsCounter, StoreAssociation, StudyEvent
out = []
for row in OrmQ.objects.all():
    out.append(("ormq", repr(SignedPackage.loads(row.payload))))
for task in Task.objects.all():
    out.append(("task", repr((task.name, task.func, task.args, task.kwargs, task.result, task.group))))
for schedule in Schedule.objects.all():
    out.append(("schedule", repr((schedule.name, schedule.func, schedule.args, schedule.kwargs))))
out += [("event", e.kind + " " + e.detail) for e in StudyEvent.objects.all()]
out += [("attempt", a.code + " " + a.message) for a in DeliveryAttempt.objects.all()]
out += [("delivery", d.last_error + " " + d.discard_reason) for d in Delivery.objects.all()]
out += [("result", r.message + " " + repr(r.outputs)) for r in InferenceResult.objects.all()]
out += [("heartbeat", repr(h.detail)) for h in Heartbeat.objects.all()]
out += [("alert", e.title + " " + e.text) for e in AlertEvent.objects.all()]
out += [("webhook", repr(w.payload) + " " + w.last_error) for w in WebhookEvent.objects.all()]
out += [("counter", c.label) for c in OpsCounter.objects.all()]
out += [("association", repr(vars(a))) for a in StoreAssociation.objects.all()]
out.append(("metrics", generate_latest(registry()).decode()))
out.append(("healthz", Client(HTTP_HOST="localhost").get("/healthz").content.decode()))
print("\\n".join(f"{kind}\\t{text}" for kind, text in out))
print("COUNTS", Task.objects.count(), DeliveryAttempt.objects.count(), StudyEvent.objects.count())
"""


class RecordingMLLP:
    """An MLLP receiver keeping every raw message; answers AA, or AE with the patient's name in MSA-3/ERR."""

    def __init__(self, mode: str) -> None:
        self.messages: list[str] = []
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                framed = mllp_frame_read(self.request)
                if framed is None:
                    return
                er7 = framed[1:-2].decode("utf-8")
                receiver.messages.append(er7)
                msh = er7.split("\r")[0].split("|")
                control_id, version = msh[9], msh[11]
                code = "AA" if mode == "AA" else "AE"
                segments = [
                    f"MSH|^~\\&|RIS|HOSP|PACSLENS||20240101120531||ACK|R{control_id}|P|{version}",
                    f"MSA|{code}|{control_id}|"
                    + ("" if code == "AA" else f"unknown patient {PATIENT_NAME} {PATIENT_ID}"),
                ]
                if code != "AA":
                    segments.append(f"ERR|||204^Unknown key identifier^HL70357|E|||patient {PATIENT_NAME}")
                self.request.sendall(b"\x0b" + "\r".join(segments).encode() + b"\x1c\r")

        self.port = free_port()
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ris() -> Iterator[tuple[RecordingMLLP, RecordingMLLP]]:
    live, echo = RecordingMLLP("AA"), RecordingMLLP("AE")
    yield live, echo
    live.close()
    echo.close()


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_markers_appear_in_no_log_queue_or_error(listener_factory, ris, webhook_receiver, tmp_path, log_format):
    live, echo = ris
    debug = {
        "PACSLENS_LOG_LEVEL": "DEBUG",
        "PACSLENS_QUEUE_LOG_LEVEL": "DEBUG",
        "PACSLENS_LOG_LIBRARY_LEVEL": "DEBUG",
        "PACSLENS_LOG_FORMAT": log_format,
        "PACSLENS_STUDY_RELEASE_GRACE": "0.5",
        "PACSLENS_STUDY_QUIET_PERIOD": "30",
    }
    listener = listener_factory(env=debug)
    env = dict(listener.env)
    config = tmp_path / "site.yaml"
    config.write_text(
        SITE_YAML.replace("DEAD_PORT", str(free_port()))
        .replace("LIVE_PORT", str(live.port))
        .replace("ECHO_PORT", str(echo.port))
    )
    command_output = [_manage(env, "setup_site"), _manage(env, "import_config", str(config))]
    subscribe = "from results.models import WebhookSubscription as W; W.objects.create(name='e', webhook_url=%r, secret='s' * 20)"
    command_output.append(_manage(env, "shell", "-c", subscribe % webhook_receiver.url))
    workers_log = listener.data_dir / "workers.log"
    with workers_log.open("ab") as log:
        workers = subprocess.Popen(
            [PYTHON, "manage.py", "run_workers"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        study = demo_study_write(outdir=tmp_path / "study", lesion=True, slices=8, size=64, seed=7)
        for path in study.paths:
            ds = pydicom.dcmread(path)
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
            ds.save_as(path, enforce_file_format=True)
        sent = listener.storescu(study.paths)
        assert sent.returncode == 0, sent.stderr
        assert listener.echo(calling_ae_title="NOT_ALLOWED") is None  # a rejection path too
        deliveries = _wait_deliveries_settled(listener, count=3)
        deadline = time.monotonic() + 60  # result.flagged and the two delivery.failed events
        while len(webhook_receiver.requests) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        workers.terminate()
        workers.wait(60)
    assert listener.stop() == 0

    # Positive controls: the markers did travel where they belong.
    assert listener.query("SELECT patient_name FROM routing_study")[0]["patient_name"] == PATIENT_NAME
    assert any(PATIENT_ID in message for message in live.messages)
    assert {d["state"] for d in deliveries} == {"delivered", "failed"}
    assert echo.messages, "the echoing RIS was sent a message and answered AE naming the patient"

    command_output.append(_manage(env, "alerts_check"))  # the failure queue's alert, made from these failures
    dump = _manage(env, "shell", "-c", DUMP_SCRIPT)
    status = _manage(env, "study_status", study.study_instance_uid, "--json")
    searched = {
        "listener log": listener.log_path.read_text(errors="replace"),
        "workers log": workers_log.read_text(errors="replace"),
        "commands": "\n".join(command_output),
        "database dump": dump,
        "study_status": status,
        "webhooks sent": "\n".join(repr(headers) + " " + raw.decode() for _, headers, raw in webhook_receiver.requests),
    }
    assert "COUNTS" in dump and "delivery_failed" in dump  # the dump saw the failure paths
    assert "alert\t" in dump and "in the failure queue" in dump  # and the alert about them
    assert (
        searched["webhooks sent"].count('"type":"delivery.failed"') == 2
        and "result.flagged" in searched["webhooks sent"]
    )
    assert "DEBUG" in searched["workers log"]  # debug logging really was on
    leaks = [
        f"{where}: {line.strip()[:300]}"
        for where, text in searched.items()
        for line in text.splitlines()
        if any(marker.lower() in line.lower() for marker in MARKERS)
    ]
    assert leaks == [], "patient data found:\n" + "\n".join(leaks)


def _manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([PYTHON, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _wait_deliveries_settled(listener, *, count: int, timeout: float = 180.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    rows: list[dict] = []
    while time.monotonic() < deadline:
        rows = listener.query("SELECT state FROM results_delivery")
        if len(rows) >= count and all(r["state"] in ("delivered", "failed") for r in rows):
            return rows
        time.sleep(0.5)
    log = (listener.data_dir / "workers.log").read_text(errors="replace")[-4000:]
    raise AssertionError(f"deliveries not settled in {timeout} s: {rows}\n{log}")
