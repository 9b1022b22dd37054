"""Benchmark: pull ingestion from a real Orthanc (C-MOVE, C-GET, WADO-RS).

1. Latency from a study being stored in Orthanc to COMPLETE in PacsLens, per method, at the
   default poll interval (60 s) and at 2 s, with `poll_due_sources` run the way django-q2's
   1-minute schedule runs it (a run every 60 s, starting up to 30 s late); and the query load
   this puts on the PACS (queries per hour, measured).
2. Retrieve throughput (instances/s) of one 300-instance 512x512 CT study by each method, beside
   dcmtk's `movescu` and `getscu` doing the same retrieve in the same run.

    .venv/bin/python bench/pull.py [--quick] [--samples 4] [--default-samples 2] [--rounds 2]

Results go to stdout and bench/out/pull-*.json. Everything runs in a temporary directory with
its own database and Orthanc; the user's var/ is never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WORK = Path(tempfile.mkdtemp(prefix="pacslens-bench-pull-"))
os.environ["PACSLENS_DATA_DIR"] = str(WORK / "data")  # never the user's var/
os.environ["DJANGO_SETTINGS_MODULE"] = "pacslens.settings"
os.environ["PACSLENS_AE_TITLE"] = "PACSLENS"
os.environ.setdefault("PACSLENS_LOG_LEVEL", "WARNING")

import django

django.setup()

from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from routing.models import ApplicationEntity, Poll, PollSource, Study, StudyRetrieve
from routing.pull.poll import poll_due_sources, retrieve
from routing.receive.listener import DicomListener
from tests.support.ct import ct_series_write, make_ct_slices
from tests.support.dicom_files import part10_bytes
from tests.support.listener_proc import dcmtk_env
from tests.support.net import free_port
from tests.support.orthanc import ORTHANC_AET, OrthancPeer, dicomweb_plugin, orthanc_start, orthanc_stop

METHODS = {"C-MOVE": ("dimse", "c-move", "CT"), "C-GET": ("dimse", "c-get", "MR"), "WADO-RS": ("dicomweb", "", "US")}
SCHEDULE_PERIOD = 60.0  # the 1-minute django-q2 schedule
SCHEDULER_WAKE = 30.0  # ... whose scheduler checks about this often


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2 s interval only, 100 instances, one round")
    parser.add_argument("--samples", type=int, default=4, help="studies per method at the 2 s interval")
    parser.add_argument("--default-samples", type=int, default=2, help="studies per method at the 60 s interval")
    parser.add_argument("--rounds", type=int, default=2, help="throughput rounds per method")
    parser.add_argument("--instances", type=int, default=300)
    args = parser.parse_args()
    if args.quick:
        args.default_samples, args.rounds, args.instances = 0, 1, 100
    for program in ("Orthanc", "movescu", "getscu"):
        if not shutil.which(program):
            print(f"{program} is not installed", file=sys.stderr)
            return 1
    call_command("migrate", interactive=False, verbosity=0)
    # The benchmark's Orthanc waits longer for its C-MOVE/C-GET peers than the tests' one.
    orthanc = orthanc_start(
        WORK / "orthanc",
        program=shutil.which("Orthanc"),
        plugin=dicomweb_plugin(),
        config={"Name": "pacslens-bench", "DicomScuTimeout": 30},
    )
    listener = DicomListener(host="127.0.0.1", port=0, ae_title="PACSLENS")
    listener.start()
    results: dict = {"instances": args.instances}
    try:
        pacs = ApplicationEntity.objects.create(
            ae_title=ORTHANC_AET, host="127.0.0.1", port=orthanc.dicom_port, may_query=True, may_send=True
        )
        orthanc.add_modality("pacslens", "PACSLENS", "127.0.0.1", listener.port)
        results["latency"] = []
        for interval, samples in ((2, args.samples), (60, args.default_samples)):
            if samples:
                results["latency"].append(latency_phase(orthanc, pacs, interval, samples))
        results["throughput"] = throughput_phase(orthanc, pacs, args.instances, args.rounds)
    finally:
        listener.stop(grace=2)
        orthanc_stop(orthanc)
    out = REPO / "bench" / "out" / f"pull-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {out.relative_to(REPO)}")
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


def latency_phase(orthanc: OrthancPeer, pacs: ApplicationEntity, interval: int, samples: int) -> dict:
    orthanc.clear()
    PollSource.objects.all().delete()
    for method, (kind, mode, modality) in METHODS.items():
        PollSource.objects.create(
            name=f"{method.lower()}-{interval}s",
            kind=kind,
            pacs=pacs if kind == "dimse" else None,
            retrieve_mode=mode or "c-move",
            dicomweb_url=orthanc.dicomweb_url if kind == "dicomweb" else "",
            interval_seconds=interval,
            modalities=modality,
            min_query_spacing_seconds=min(5, max(1, interval // 2)),
        )
    stop = threading.Event()
    scheduler = threading.Thread(target=schedule_emulator, args=(stop,), daemon=True)
    started = time.monotonic()
    scheduler.start()
    latencies: dict[str, list[float]] = {m: [] for m in METHODS}
    print(f"\nlatency at a {interval} s poll interval, {samples} studies per method", flush=True)
    for _ in range(samples):
        time.sleep(random.uniform(0, interval))  # a random phase against the polls
        stored = {}
        for method, (_, _, modality) in METHODS.items():
            uid = orthanc_study(orthanc, modality)
            stored[method] = (uid, timezone.now())
        for method, (uid, at) in stored.items():
            study = wait_complete(uid, timeout=interval * 3 + SCHEDULE_PERIOD + 60)
            latencies[method].append((study.completed_at - at).total_seconds())
    elapsed = time.monotonic() - started
    stop.set()
    scheduler.join(timeout=SCHEDULE_PERIOD + 60)
    phase = {"interval_s": interval, "methods": {}}
    for method in METHODS:
        starts = list(
            Poll.objects.filter(source__name=f"{method.lower()}-{interval}s")
            .order_by("started_at")
            .values_list("started_at", flat=True)
        )
        span = (starts[-1] - starts[0]).total_seconds() if len(starts) > 1 else elapsed
        per_hour = (len(starts) - 1) / span * 3600 if len(starts) > 1 else 0
        values = latencies[method]
        phase["methods"][method] = {
            "latency_s": [round(v, 2) for v in values],
            "median_s": round(statistics.median(values), 2),
            "max_s": round(max(values), 2),
            "queries_per_hour": round(per_hour),
            "polls": len(starts),
        }
        print(
            f"  {method:8} median {statistics.median(values):6.2f} s  max {max(values):6.2f} s  "
            f"queries/hour {per_hour:6.0f}  ({len(starts)} polls)",
            flush=True,
        )
    return phase


def schedule_emulator(stop: threading.Event) -> None:
    """Run poll_due_sources as django-q2 runs a 1-minute schedule: each run up to 30 s late, in a worker."""
    next_run = time.monotonic()
    first = True
    while not stop.is_set():
        start_at = next_run + (0 if first else random.uniform(0, SCHEDULER_WAKE))
        first = False
        while time.monotonic() < start_at and not stop.is_set():
            time.sleep(0.1)
        if stop.is_set():
            return
        threading.Thread(target=_worker_run, daemon=True).start()
        next_run += SCHEDULE_PERIOD


def _worker_run() -> None:
    try:
        poll_due_sources()
    finally:
        connection.close()


def throughput_phase(orthanc: OrthancPeer, pacs: ApplicationEntity, count: int, rounds: int) -> dict:
    orthanc.clear()
    PollSource.objects.all().delete()
    files = ct_series_write(WORK / "series", count, study_instance_uid=None)
    study_uid = str(__import__("pydicom").dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    for path in files:
        orthanc.upload(path)
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    move_port = free_port()
    orthanc.add_modality("movescu", "MOVESCU", "127.0.0.1", move_port)
    orthanc.add_modality("getscu", "GETSCU", "127.0.0.1", free_port())
    print(f"\nthroughput: one {count}-instance study ({size_mb:.0f} MB), {rounds} round(s)", flush=True)
    sources = {
        "PacsLens C-MOVE": PollSource.objects.create(name="tp-move", pacs=pacs, retrieve_mode="c-move"),
        "PacsLens C-GET": PollSource.objects.create(name="tp-get", pacs=pacs, retrieve_mode="c-get"),
        "PacsLens WADO-RS": PollSource.objects.create(
            name="tp-wado", kind="dicomweb", dicomweb_url=orthanc.dicomweb_url
        ),
    }
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]
    timings: dict[str, list[float]] = {}
    for _ in range(rounds):
        out = WORK / "dcmtk-out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        timings.setdefault("dcmtk movescu", []).append(
            timed_command(
                [
                    "movescu",
                    "-S",
                    "-aet",
                    "MOVESCU",
                    "-aec",
                    ORTHANC_AET,
                    "-aem",
                    "MOVESCU",
                    "--port",
                    str(move_port),
                    "-od",
                    str(out),
                    *keys,
                    "127.0.0.1",
                    str(orthanc.dicom_port),
                ],
                out,
                count,
            )
        )
        shutil.rmtree(out)
        out.mkdir()
        timings.setdefault("dcmtk getscu", []).append(
            timed_command(
                [
                    "getscu",
                    "-S",
                    "-aet",
                    "GETSCU",
                    "-aec",
                    ORTHANC_AET,
                    "-od",
                    str(out),
                    *keys,
                    "127.0.0.1",
                    str(orthanc.dicom_port),
                ],
                out,
                count,
            )
        )
        for name, source in sources.items():
            timings.setdefault(name, []).append(timed_retrieve(source, study_uid, count))
    table = {}
    for name, values in timings.items():
        best = min(values)
        table[name] = {"seconds": [round(v, 2) for v in values], "instances_per_s": round(count / best, 1)}
        print(
            f"  {name:18} best {best:6.2f} s  {count / best:7.1f} instances/s  ({size_mb / best:6.1f} MB/s)", flush=True
        )
    return {"study_mb": round(size_mb, 1), "methods": table}


def timed_command(command: list[str], out: Path, count: int) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    received = sum(1 for p in out.rglob("*") if p.is_file())
    if received != count:
        raise RuntimeError(f"{command[0]} received {received} of {count} instances")
    return elapsed


def timed_retrieve(source: PollSource, study_uid: str, count: int) -> float:
    Study.objects.filter(study_instance_uid=study_uid).delete()  # a fresh ingest, not the duplicate path
    for path in (WORK / "data" / "instances").rglob("*.dcm"):  # keep the folders: ingest remembers them
        path.unlink()
    StudyRetrieve.objects.filter(source=source).delete()
    record = StudyRetrieve.objects.create(source=source, study_instance_uid=study_uid, state="retrieving", attempts=1)
    started = time.perf_counter()
    outcome = retrieve(record=record, source=source)
    elapsed = time.perf_counter() - started
    held = Study.objects.get(study_instance_uid=study_uid).instances.count()
    if not outcome.ok or held != count:
        raise RuntimeError(f"{source.name}: {outcome.error or 'incomplete'} ({held} of {count} instances)")
    return elapsed


def orthanc_study(orthanc: OrthancPeer, modality: str) -> str:
    now = timezone.localtime()
    slices = make_ct_slices(3, patient_name="Bench^Synthetic", patient_id="BENCH")
    for ds in slices:
        ds.Modality = modality
        ds.StudyDate, ds.StudyTime = f"{now:%Y%m%d}", f"{now:%H%M%S}"
        orthanc.upload(part10_bytes(ds))
    return str(slices[0].StudyInstanceUID)


def wait_complete(uid: str, timeout: float) -> Study:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        study = Study.objects.filter(study_instance_uid=uid, state="complete").first()
        if study:
            return study
        time.sleep(0.05)
    raise RuntimeError(f"study not complete after {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
