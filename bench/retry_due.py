"""Benchmark: how late does a delivery retry start after it falls due, and how soon after the RIS
comes back does the result reach it?

The deployed processes (`dicom_listener` + `run_workers`) on SQLite; one generated head CT is
sent with dcmtk `storescu`; its HL7 result goes to a RIS (MLLP) that is down for the first
`--outage` seconds. The destination retries with a base of 2 s, a cap of 8 s, a breaker that
opens after 3 failures and cools down for 10 s (the scenario of issue 17). Meanwhile this
script reads the delivery row every 20 ms, so it knows when each attempt was due (its
`next_attempt_at`, or the breaker's `circuit_open_until` if later) and when it started (the
attempt rows).

Figures: per attempt, start minus due time (median, max); the RIS back up → HL7 message received.
It ends with issue 17's target, MET or NOT MET (bench/_targets.py): every retry starts within
2 s of its due time (the line shows the latest of them).

    .venv/bin/python bench/retry_due.py [--outage 60] [--quick]

Everything runs in a temporary directory; the user's var/ is never touched. Synthetic data only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pacslens.settings")
WORK = Path(tempfile.mkdtemp(prefix="pacslens-bench-retry-"))
os.environ["PACSLENS_DATA_DIR"] = str(WORK / "unused-data")  # never the user's var/

from bench._targets import Target, targets_print
from bench.sustained import RIS, RULE_NAME, deployed_start, deployed_stop
from tests.support.listener_proc import DB_NAME, PYTHON, base_env, dcmtk_env, template_db_create
from tests.support.net import free_port
from tests.support.postgres import Database, sqlite_url

DESTINATION = f"""\
pacslens_config: 1
destinations:
- name: ris
  kind: hl7
  host: 127.0.0.1
  port: {{port}}
  hl7_message_type: ORU^R01
  timeout_seconds: 2
  max_attempts: 100
  backoff_base_seconds: 2
  backoff_cap_seconds: 8
  breaker_threshold: 3
  breaker_cooldown_seconds: 10
  rules: ['{RULE_NAME}']
"""


def parse_time(value) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace(" ", "T")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the RIS is down")
    parser.add_argument("--quick", action="store_true", help="a 20 s outage: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.outage = min(args.outage, 20.0)
    data_dir = WORK / "data"
    template_db_create(data_dir, calling_ae_titles=["STORESCU"])
    db = Database(sqlite_url(data_dir / DB_NAME))
    ris_port = free_port()  # nothing listens on it until the outage ends
    dicom_port = free_port()
    env = base_env(data_dir, PACSLENS_DICOM_PORT=str(dicom_port), PACSLENS_LOG_LEVEL="WARNING")
    started: list[tuple[str, subprocess.Popen]] = []
    ris = None
    try:
        subprocess.run([PYTHON, "manage.py", "setup_site"], cwd=REPO, env=env, check=True, capture_output=True)
        config = data_dir / "ris.yaml"
        config.write_text(DESTINATION.format(port=ris_port))
        subprocess.run([PYTHON, "manage.py", "import_config", str(config)], cwd=REPO, env=env, check=True)
        study_dir = WORK / "study"
        subprocess.run(
            [PYTHON, "manage.py", "make_demo_study", "--slices", "16", "--size", "256", str(study_dir)],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
        deployed_start(data_dir=data_dir, env=env, db=db, port=dicom_port, started=started)
        files = sorted(str(p) for p in study_dir.rglob("*") if p.is_file())
        subprocess.run(
            ["storescu", "-aec", "PACSLENS", "127.0.0.1", str(dicom_port), *files], env=dcmtk_env(), check=True
        )
        print(f"study sent ({len(files)} instances); the RIS is down for {args.outage:.0f} s", flush=True)

        due_by_attempt: dict[int, float] = {}  # attempt number → when it was due
        outage_ends = None
        deadline = time.time() + args.outage + 600
        while time.time() < deadline:
            rows = db.query(
                "SELECT d.state, d.attempts, d.next_attempt_at, x.circuit_open_until FROM results_delivery d "
                "JOIN results_destination x ON x.id = d.destination_id",
                (),
            )
            if rows:
                row = rows[0]
                if row["state"] == "pending":
                    due = parse_time(row["next_attempt_at"])
                    if row["circuit_open_until"]:
                        due = max(due, parse_time(row["circuit_open_until"]))
                    due_by_attempt[int(row["attempts"]) + 1] = due
                if row["state"] in ("delivered", "failed"):
                    break
            if outage_ends is None and rows and time.time() - parse_time_first(db) >= args.outage:
                ris = RIS(port=ris_port)
                outage_ends = time.time()
                print("RIS up", flush=True)
            time.sleep(0.02)
        attempts = db.query("SELECT number, started_at, outcome FROM results_deliveryattempt ORDER BY number", ())
        late = []
        for attempt in attempts:
            number = int(attempt["number"])
            if number == 1 or number not in due_by_attempt:
                continue
            late.append(parse_time(attempt["started_at"]) - due_by_attempt[number])
        arrival = min(ris.arrivals.values()) if ris and ris.arrivals else None
        print(f"\nattempts: {len(attempts)} (last: {attempts[-1]['outcome'] if attempts else '-'})")
        if late:
            print(
                f"retry start after its due time: median {statistics.median(late):.2f} s, "
                f"max {max(late):.2f} s over {len(late)} retries"
            )
        if arrival and outage_ends:
            print(f"RIS back up → HL7 message received: {arrival - outage_ends:.2f} s")
        else:
            print("the HL7 message never arrived (see the workers' log)")
        notes = [
            f"{len(late)} retries during a {args.outage:.0f} s outage (base 2 s, cap 8 s, breaker 3 failures / "
            f"10 s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end"
        ]
        if args.quick:
            notes.append("--quick: a 20 s outage, fewer retries than the issue's scenario")
        targets_print(
            "bench/retry_due.py",
            [Target("latest retry start after its due time", max(late) if late else None, 2, False, unit=" s")],
            notes=notes,
        )
    finally:
        deployed_stop([popen for _, popen in started], timeout=90)
        if ris:
            ris.close()
        shutil.rmtree(WORK, ignore_errors=True)


def parse_time_first(db: Database) -> float:
    """When the first delivery attempt started (the outage is timed from there)."""
    rows = db.query("SELECT MIN(started_at) AS first FROM results_deliveryattempt", ())
    return parse_time(rows[0]["first"]) if rows and rows[0]["first"] else time.time()


if __name__ == "__main__":
    main()
