"""Benchmark: sustained load, end to end, on SQLite and then on PostgreSQL.

200 generated head CT studies (a mix of sizes, 10 % with a planted lesion) are pushed by 4
concurrent dcmtk `storescu` senders (one association per study, as a PACS auto-forward does)
into one machine running `dicom_listener` and `run_workers` with 2 worker processes, exactly as
deployed. The RIS is an MLLP receiver in this process that stamps each HL7 message's arrival.

Figures, per database:
- studies/hour end to end: studies / (last RIS ACK - first instance sent);
- latency from the study's last instance received to the RIS's ACK of its HL7 message
  (p50/p95/max; the RIS answers each message at once and stamps when its ACK went out);
- queue depth over time: studies in flight, broker rows, deliveries pending;
- peak memory (RSS) of every process.

    .venv/bin/python bench/sustained.py [--studies 200] [--senders 4] [--workers 2]
                                         [--backends sqlite,postgres] [--quick]

PostgreSQL is a private cluster (tests/support/postgres.py) with its default durability (fsync on).
Everything runs in a temporary directory; the user's var/ is never touched. Results go to
stdout and bench/out/sustained-*.json. Synthetic demonstration data only.

It ends with issue 17's targets, per database, MET or NOT MET (bench/_targets.py): ≥ 10,000
head CTs/hour on 2 cores, p95 last instance → RIS ACK ≤ 5 s. One run per database, not a median
of rounds: a run is 200 studies and minutes long.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import signal
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pacslens.settings")
WORK = Path(tempfile.mkdtemp(prefix="pacslens-bench-sustained-"))
os.environ["PACSLENS_DATA_DIR"] = str(WORK / "unused-data")  # never the user's var/

import psutil

from bench._targets import Target, targets_print
from tests.support.listener_proc import DB_NAME, PYTHON, base_env, dcmtk_env, template_db_create
from tests.support.net import free_port
from tests.support.postgres import Database, postgres_cluster_start, sqlite_url

OUT = REPO / "bench" / "out"
MiB = 1024 * 1024
RULE_NAME = "Demo: CT head to the demonstration model"
# (share, slices, rows/columns): thin low-dose heads, standard heads, thin-slice heads.
MIX = [(0.25, 64, 256), (0.5, 150, 512), (0.25, 250, 512)]
QUICK_MIX = [(0.5, 32, 256), (0.5, 64, 256)]
SAMPLE_S = 0.5
SETTLE_TIMEOUT_S = 1800.0
_TEMPLATE_SCRIPT = (
    "import django; django.setup()\n"
    "from django.core.management import call_command\n"
    "from routing.models import ApplicationEntity\n"
    "call_command('migrate', interactive=False, verbosity=0)\n"
    "ApplicationEntity.objects.create(ae_title='STORESCU', host='127.0.0.1', may_send=True)\n"
)
DESTINATION = f"""\
pacslens_config: 1
destinations:
- name: ris
  kind: hl7
  host: 127.0.0.1
  port: {{port}}
  hl7_message_type: ORU^R01
  rules: ['{RULE_NAME}']
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--quick", action="store_true", help="40 small studies: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.studies = min(args.studies, 40)
    storescu = shutil.which("storescu")
    if not storescu:
        print("dcmtk's storescu is needed: apt-get install dcmtk", file=sys.stderr)
        return 2
    try:
        print(f"generating {args.studies} studies in {WORK} ...", flush=True)
        studies = studies_generate(WORK / "studies", count=args.studies, mix=QUICK_MIX if args.quick else MIX)
        megabytes = sum(s.megabytes for s in studies)
        print(
            f"  {sum(s.slices for s in studies)} instances, {megabytes:.0f} MB, "
            f"{sum(s.lesion for s in studies)} with a lesion",
            flush=True,
        )
        runs = []
        for backend in args.backends.split(","):
            print(f"\n--- {backend}: {args.senders} senders, {args.workers} worker processes ---", flush=True)
            runs.append(run_backend(backend.strip(), studies=studies, storescu=storescu, args=args))
            report(runs[-1])
        summary(runs)
        OUT.mkdir(exist_ok=True)
        out = OUT / f"sustained-{datetime.now():%Y%m%d-%H%M%S}.json"
        out.write_text(json.dumps({"args": vars(args), "cpus": os.cpu_count(), "runs": runs}, indent=1, default=str))
        print(f"\nwritten to {out.relative_to(REPO)}")
        targets(runs, args)
        return 0
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


# --- test data ------------------------------------------------------------------------------------


@dataclass
class GeneratedStudy:
    study_instance_uid: str
    folder: Path
    slices: int
    size: int
    lesion: bool
    megabytes: float


def studies_generate(folder: Path, *, count: int, mix: list[tuple[float, int, int]]) -> list[GeneratedStudy]:
    from pacslens.demo_study import demo_study_write

    rng = random.Random(7)
    shapes = [(slices, size) for share, slices, size in mix for _ in range(round(share * count))]
    shapes = (shapes + [mix[0][1:]] * count)[:count]
    rng.shuffle(shapes)
    lesions = set(rng.sample(range(count), max(1, count // 10)))
    studies = []
    for index, (slices, size) in enumerate(shapes):
        out = folder / f"{index:04d}"
        demo = demo_study_write(outdir=out, slices=slices, size=size, lesion=index in lesions, seed=index)
        studies.append(
            GeneratedStudy(
                demo.study_instance_uid,
                out,
                slices,
                size,
                index in lesions,
                sum(p.stat().st_size for p in demo.paths) / 1e6,
            )
        )
    return studies


# --- the RIS -----------------------------------------------------------------------------------


class _ReusableServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True  # bench/retry_due.py brings the RIS up on a port it kept free


class RIS:
    """An MLLP receiver answering AA and stamping when each MSH-10 arrived and when its ACK went out (wall clock)."""

    def __init__(self, port: int | None = None) -> None:
        self.arrivals: dict[str, float] = {}
        self.acks: dict[str, float] = {}
        self.messages = 0
        ris = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                buffer = b""
                while True:
                    while b"\x1c\r" not in buffer:
                        chunk = self.request.recv(65536)
                        if not chunk:
                            return
                        buffer += chunk
                    end = buffer.index(b"\x1c\r")
                    message, buffer = buffer[1:end].decode("utf-8", "replace"), buffer[end + 2 :]
                    msh = message.split("\r", 1)[0].split("|")
                    control_id, version = msh[9], msh[11]
                    ris.arrivals.setdefault(control_id, time.time())
                    ris.messages += 1
                    ack = f"MSH|^~\\&|RIS|HOSP|PACSLENS||20240101120000||ACK^R01|A{control_id}|P|{version}\rMSA|AA|{control_id}"
                    self.request.sendall(b"\x0b" + ack.encode() + b"\x1c\r")
                    ris.acks.setdefault(control_id, time.time())

        self.port = port or free_port()
        self.server = _ReusableServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- one run -------------------------------------------------------------------------------------


@dataclass
class Process:
    role: str
    popen: subprocess.Popen
    peak_rss: dict[str, float] = field(default_factory=dict)  # label -> MiB
    cpu_s: dict[int, float] = field(default_factory=dict)  # pid -> user+system seconds, last seen

    def cpu_seconds(self) -> float:
        """CPU time of the role's processes (a process that exited counts up to its last sample)."""
        return sum(self.cpu_s.values())

    def sample(self) -> None:
        try:
            root = psutil.Process(self.popen.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for index, proc in enumerate(tree):
            label = f"{self.role}" if index == 0 else f"{self.role} child {proc.pid}"
            try:
                rss = proc.memory_info().rss / MiB
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            self.peak_rss[label] = max(self.peak_rss.get(label, 0.0), rss)
            self.cpu_s[proc.pid] = times.user + times.system


def run_backend(backend: str, *, studies: list[GeneratedStudy], storescu: str, args) -> dict:
    data_dir = WORK / f"data-{backend}"
    cluster = None
    extra: dict[str, str] = {}
    if backend == "postgres":
        cluster = postgres_cluster_start(durable=True)
        extra["DATABASE_URL"] = cluster.database_create("pacslens")
        data_dir.mkdir(parents=True)
        subprocess.run([PYTHON, "-c", _TEMPLATE_SCRIPT], cwd=REPO, env=base_env(data_dir, **extra), check=True)
    elif backend == "sqlite":
        template_db_create(data_dir, calling_ae_titles=["STORESCU"])
    else:
        raise SystemExit(f"unknown backend {backend!r} (sqlite, postgres)")
    db = Database(extra.get("DATABASE_URL") or sqlite_url(data_dir / DB_NAME))
    port = free_port()
    env = base_env(
        data_dir,
        PACSLENS_DICOM_PORT=str(port),
        PACSLENS_WORKERS=str(args.workers),
        PACSLENS_INFERENCE_INTRA_OP_THREADS="1",
        PACSLENS_LOG_LEVEL="WARNING",
        **extra,
    )
    ris = RIS()
    started: list[tuple[str, subprocess.Popen]] = []
    try:
        subprocess.run([PYTHON, "manage.py", "setup_site"], cwd=REPO, env=env, check=True, capture_output=True)
        config = data_dir / "ris.yaml"
        config.write_text(DESTINATION.format(port=ris.port))
        subprocess.run(
            [PYTHON, "manage.py", "import_config", str(config)], cwd=REPO, env=env, check=True, capture_output=True
        )
        deployed_start(data_dir=data_dir, env=env, db=db, port=port, started=started)
        processes = [Process(role, popen) for role, popen in started]
        return drive(
            backend,
            db=db,
            ris=ris,
            processes=processes,
            studies=studies,
            storescu=storescu,
            port=port,
            senders=args.senders,
        )
    finally:
        deployed_stop([popen for _, popen in started])
        ris.close()
        if cluster:
            cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def deployed_start(
    *, data_dir: Path, env: dict[str, str], db: Database, port: int, started: list[tuple[str, subprocess.Popen]]
) -> None:
    """`dicom_listener` and `run_workers` as deployed (logs in `data_dir`/<role>.log), each waited
    for until it beats. Appends (role, process) to `started` as it goes, so the caller's `finally`
    stops whatever did start (`deployed_stop`)."""
    for role, command in (("listener", ["dicom_listener", "--port", str(port)]), ("workers", ["run_workers"])):
        with open(data_dir / f"{role}.log", "ab") as log:
            popen = subprocess.Popen(
                [PYTHON, "manage.py", *command],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append((role, popen))
        wait_heartbeat(db, role, popen.pid)


def deployed_stop(popens: list[subprocess.Popen], timeout: float = 90.0) -> None:
    """SIGTERM to each (the deployed shutdown), SIGKILL to the process group of any still running after `timeout`."""
    for popen in popens:
        popen.send_signal(signal.SIGTERM)
    for popen in popens:
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)


def wait_heartbeat(db: Database, role: str, pid: int, timeout: float = 60.0) -> None:
    """Until a process of `pid`'s tree beats (a multi-process listener's forked children do)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            tree = {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            raise SystemExit(f"{role} exited at start (see its log)") from None
        beating = {
            int(r["identity"].rsplit(":", 1)[1])
            for r in db.query("SELECT identity FROM routing_heartbeat WHERE role = %s", (role,))
        }
        if tree & beating:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{role} did not start within {timeout} s")
        time.sleep(0.2)


def drive(backend, *, db, ris, processes, studies, storescu, port, senders) -> dict:
    work: queue.Queue[GeneratedStudy] = queue.Queue()
    for study in studies:
        work.put(study)
    failures: list[str] = []

    def sender() -> None:
        while True:
            try:
                study = work.get_nowait()
            except queue.Empty:
                return
            done = subprocess.run(
                [storescu, "-aet", "STORESCU", "-aec", "PACSLENS", "127.0.0.1", str(port), "+sd", str(study.folder)],
                env=dcmtk_env(),
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                failures.append(f"{study.folder.name}: {done.stderr[-300:]}")

    depth: list[dict] = []
    stop = threading.Event()

    def sampler() -> None:
        last_depth = 0.0
        while not stop.is_set():
            for proc in processes:
                proc.sample()
            now = time.monotonic()
            if now - last_depth >= 2.0:
                last_depth = now
                try:
                    depth.append({"t": round(now - started, 1), **queue_depth(db)})
                except Exception as exc:
                    depth.append({"t": round(now - started, 1), "error": type(exc).__name__})
            stop.wait(SAMPLE_S)

    started = time.monotonic()
    started_wall = time.time()
    threads = [threading.Thread(target=sender) for _ in range(senders)]
    monitor = threading.Thread(target=sampler, daemon=True)
    monitor.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sent_s = time.monotonic() - started
    uids = [s.study_instance_uid for s in studies]
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        states = {
            r["study_instance_uid"]: r["state"] for r in db.query("SELECT study_instance_uid, state FROM routing_study")
        }
        if all(states.get(uid) in ("delivered", "failed", "ignored") for uid in uids):
            break
        if time.monotonic() > deadline:
            print(f"  not settled after {SETTLE_TIMEOUT_S} s", flush=True)
            break
        time.sleep(1.0)
    stop.set()
    monitor.join()
    for proc in processes:
        proc.sample()

    rows = db.query(
        "SELECT s.study_instance_uid, s.state, s.last_received_at, d.idempotency_key "
        "FROM routing_study s LEFT JOIN results_delivery d ON d.study_id = s.id"
    )
    latencies, last_update = [], started_wall
    for row in rows:
        arrived = ris.acks.get(row["idempotency_key"] or "")
        if arrived is None:
            continue
        last_received = row["last_received_at"]
        if isinstance(last_received, str):  # SQLite returns text, in UTC
            last_received = datetime.fromisoformat(last_received)
        if last_received.tzinfo is None:
            last_received = last_received.replace(tzinfo=UTC)
        latencies.append(arrived - last_received.timestamp())
        last_update = max(last_update, arrived)
    elapsed = last_update - started_wall
    by_state: dict[str, int] = {}
    for row in rows:
        by_state[row["state"]] = by_state.get(row["state"], 0) + 1
    latencies.sort()
    return {
        "backend": backend,
        "studies": len(studies),
        "instances": sum(s.slices for s in studies),
        "megabytes": round(sum(s.megabytes for s in studies), 1),
        "send_failures": failures,
        "states": by_state,
        "delivered_to_ris": len(ris.acks),
        "hl7_messages": ris.messages,
        "sent_seconds": round(sent_s, 1),
        "end_to_end_seconds": round(elapsed, 1),
        "studies_per_hour": round(len(ris.acks) / elapsed * 3600) if elapsed > 0 else None,
        "latency_s": {
            "p50": round(statistics.median(latencies), 2) if latencies else None,
            "p95": round(percentile(latencies, 95), 2) if latencies else None,
            "max": round(latencies[-1], 2) if latencies else None,
        },
        "queue_depth": depth,
        "peak_rss_mib": {label: round(mib, 1) for proc in processes for label, mib in proc.peak_rss.items()},
        # What bounds throughput on this machine: CPU seconds per study by role, and the rate at
        # which they would use every core (the model's own threads included).
        "cpu_s_per_study": {
            proc.role: round(proc.cpu_seconds() / len(studies), 3) for proc in processes if len(studies)
        },
        "cpu_bound_studies_per_hour": round(
            (os.cpu_count() or 1) * 3600 / (sum(proc.cpu_seconds() for proc in processes) / len(studies))
        )
        if studies and sum(proc.cpu_seconds() for proc in processes)
        else None,
    }


def queue_depth(db: Database) -> dict:
    in_flight = db.scalar(
        "SELECT COUNT(*) FROM routing_study WHERE state IN "
        "('receiving', 'complete', 'routed', 'inferring', 'delivering')"
    )
    waiting = db.scalar("SELECT COUNT(*) FROM routing_study WHERE state IN ('complete', 'routed')")
    broker = db.scalar("SELECT COUNT(*) FROM django_q_ormq")
    deliveries = db.scalar("SELECT COUNT(*) FROM results_delivery WHERE state IN ('pending', 'in_flight')")
    delivered = db.scalar("SELECT COUNT(*) FROM routing_study WHERE state = 'delivered'")
    return {
        "in_flight": in_flight,
        "waiting_for_workers": waiting,
        "broker": broker,
        "deliveries": deliveries,
        "delivered": delivered,
    }


def percentile(sorted_values: list[float], pct: float) -> float:
    index = max(0, min(len(sorted_values) - 1, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


# --- output ----------------------------------------------------------------------------------------


def report(run: dict) -> None:
    print(
        f"  sent in {run['sent_seconds']} s; last RIS ACK after {run['end_to_end_seconds']} s; "
        f"states {run['states']}; HL7 messages {run['hl7_messages']} for {run['delivered_to_ris']} studies"
    )
    if run["send_failures"]:
        print(f"  send failures: {len(run['send_failures'])}: {run['send_failures'][:3]}")
    print("  queue depth (t s: studies in flight / waiting for a worker / broker rows / deliveries / delivered)")
    samples = [s for s in run["queue_depth"] if "error" not in s]
    step = max(1, len(samples) // 15)
    for sample in samples[::step] + samples[-1:]:
        print(
            f"    {sample['t']:7.1f}: {sample['in_flight']:4} / {sample['waiting_for_workers']:4} / "
            f"{sample['broker']:4} / {sample['deliveries']:4} / {sample['delivered']:4}"
        )
    per_study = ", ".join(f"{role} {seconds:.2f} s" for role, seconds in run["cpu_s_per_study"].items())
    print(
        f"  CPU per study: {per_study}; all cores busy at this cost: {run['cpu_bound_studies_per_hour']} studies/hour"
    )
    print("  peak RSS (MiB)")
    for label, mib in run["peak_rss_mib"].items():
        print(f"    {label:32} {mib:8.1f}")


def summary(runs: list[dict]) -> None:
    print("\n| database | studies | instances | MB | studies/hour | p50 s | p95 s | max s | peak RSS total MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        latency = run["latency_s"]
        total = sum(run["peak_rss_mib"].values())
        print(
            f"| {run['backend']} | {run['delivered_to_ris']}/{run['studies']} | {run['instances']} | "
            f"{run['megabytes']:.0f} | {run['studies_per_hour']} | {latency['p50']} | {latency['p95']} | "
            f"{latency['max']} | {total:.0f} |"
        )


def targets(runs: list[dict], args) -> None:
    """Issue 17's pipeline targets, per database."""
    lines = []
    for run in runs:
        lines.append(
            Target(f"{run['backend']}: head CTs/hour end to end", run["studies_per_hour"], 10_000, True, digits=0)
        )
        lines.append(
            Target(f"{run['backend']}: p95 last instance → RIS ACK", run["latency_s"]["p95"], 5, False, unit=" s")
        )
    cores = os.cpu_count()
    notes = [
        f"{args.studies} studies, {args.senders} senders, {args.workers} worker processes, on {cores} cores"
        + ("" if cores == 2 else " (the target is for 2)")
        + f"; one run per database; load average {os.getloadavg()[0]:.1f} at the end",
    ]
    if any(run["delivered_to_ris"] < run["studies"] for run in runs):
        notes.append("not every study reached the RIS: the figures cover those that did")
    if args.quick:
        notes.append("--quick: a smoke run (40 small studies), not the issue's conditions")
    targets_print("bench/sustained.py", lines, notes=notes)


if __name__ == "__main__":
    sys.exit(main())
