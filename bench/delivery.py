"""Benchmark: result delivery latency, SR to Orthanc and HL7 to an MLLP RIS.

20 generated head CT studies are sent one after another with dcmtk `storescu` (one association
each) to the listener as deployed (`dicom_listener` + `run_workers` subprocesses). Each result
goes to two destinations: Orthanc as the PACS (SR by C-STORE) and an MLLP listener as the RIS
(ORU^R01). Per study, from the database rows the pipeline writes:

- last instance received (the listener records it just before answering the C-STORE) → SR
  stored in Orthanc (our SCU got Orthanc's C-STORE response) and → HL7 ACK received;
- study COMPLETE → each of those;
- association released → study COMPLETE (the completeness wait).

Then the SR C-STORE round trip alone: one SR stored 50 times on one open association to Orthanc.

    .venv/bin/python bench/delivery.py [--studies 20] [--slices 300] [--quick]

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
WORK = Path(tempfile.mkdtemp(prefix="pacslens-bench-delivery-"))
os.environ["PACSLENS_DATA_DIR"] = str(WORK / "unused-data")  # never the user's var/

from bench.sustained import RIS, deployed_start, deployed_stop, percentile, studies_generate
from tests.support.identities import identity
from tests.support.listener_proc import DB_NAME, PYTHON, base_env, dcmtk_env, template_db_create
from tests.support.net import free_port
from tests.support.orthanc import dicomweb_plugin, orthanc_start, orthanc_stop
from tests.support.postgres import Database, sqlite_url

RULE_NAME = "Demo: CT head to the demonstration model"
DESTINATIONS = """\
pacslens_config: 1
ae_titles:
- {{ae_title: {aet}, host: 127.0.0.1, port: {port}, may_send: false, receives_results: true}}
destinations:
- {{name: pacs, kind: dicom, application_entity: {aet}, rules: ['{rule}']}}
- {{name: ris, kind: hl7, host: 127.0.0.1, port: {ris_port}, hl7_message_type: ORU^R01, rules: ['{rule}']}}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="5 studies of 64 slices")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.slices = min(args.studies, 5), min(args.slices, 64)
    storescu, orthanc_program, plugin = shutil.which("storescu"), shutil.which("Orthanc"), dicomweb_plugin()
    if not (storescu and orthanc_program and plugin):
        print(
            "needs dcmtk, orthanc and orthanc-dicomweb (apt-get install dcmtk orthanc orthanc-dicomweb)",
            file=sys.stderr,
        )
        return 2
    orthanc = None
    try:
        print(f"generating {args.studies} studies of {args.slices} slices ...", flush=True)
        studies = studies_generate(WORK / "studies", count=args.studies, mix=[(1.0, args.slices, 512)])
        (WORK / "orthanc").mkdir()
        orthanc = orthanc_start(WORK / "orthanc", program=orthanc_program, plugin=plugin)
        rows = run_pipeline(studies, storescu=storescu, orthanc=orthanc)
        report(rows, studies=len(studies))
        sr_round_trip(orthanc, studies[0].folder)
        return 0
    finally:
        if orthanc:
            orthanc_stop(orthanc)
        shutil.rmtree(WORK, ignore_errors=True)


def run_pipeline(studies, *, storescu: str, orthanc) -> list[dict]:
    data_dir = WORK / "data"
    template_db_create(data_dir, calling_ae_titles=["STORESCU"])
    db = Database(sqlite_url(data_dir / DB_NAME))
    port = free_port()
    env = base_env(data_dir, PACSLENS_DICOM_PORT=str(port), PACSLENS_LOG_LEVEL="WARNING")
    ris = RIS()
    started: list[tuple[str, subprocess.Popen]] = []
    try:
        subprocess.run([PYTHON, "manage.py", "setup_site"], cwd=REPO, env=env, check=True, capture_output=True)
        config = data_dir / "destinations.yaml"
        config.write_text(
            DESTINATIONS.format(aet=orthanc.aet, port=orthanc.dicom_port, ris_port=ris.port, rule=RULE_NAME)
        )
        subprocess.run(
            [PYTHON, "manage.py", "import_config", str(config)], cwd=REPO, env=env, check=True, capture_output=True
        )
        deployed_start(data_dir=data_dir, env=env, db=db, port=port, started=started)
        for index, study in enumerate(studies):
            subprocess.run(
                [storescu, "-aet", "STORESCU", "-aec", "PACSLENS", "127.0.0.1", str(port), "+sd", str(study.folder)],
                env=dcmtk_env(),
                check=True,
                capture_output=True,
            )
            settle(db, study.study_instance_uid)
            print(f"  study {index + 1}/{len(studies)} delivered", flush=True)
        return measurements(db)
    finally:
        deployed_stop([popen for _, popen in started], timeout=60)
        ris.close()


def settle(db: Database, uid: str, timeout: float = 300.0) -> None:
    """One study at a time, so each figure is the pipeline's own latency, not queueing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = db.scalar("SELECT state FROM routing_study WHERE study_instance_uid = %s", (uid,))
        if state in ("delivered", "failed", "ignored"):
            return
        time.sleep(0.1)
    raise SystemExit(f"study {uid} did not settle in {timeout} s")


def measurements(db: Database) -> list[dict]:
    studies = db.query("SELECT id, state, last_received_at, completed_at FROM routing_study")
    rows = []
    for study in studies:
        acked = {
            r["kind"]: _ts(r["ended_at"])
            for r in db.query(
                "SELECT d.kind, a.ended_at FROM results_delivery d JOIN results_deliveryattempt a ON a.delivery_id = d.id "
                "WHERE d.study_id = %s AND a.outcome = 'success'",
                (study["id"],),
            )
        }
        released = db.scalar(
            "SELECT MAX(a.ended_at) FROM routing_storeassociation a JOIN routing_instance i ON i.association_id = a.id "
            "WHERE i.study_id = %s",
            (study["id"],),
        )
        last, complete = _ts(study["last_received_at"]), _ts(study["completed_at"])
        rows.append(
            {
                "state": study["state"],
                "last_to_sr": acked.get("dicom", float("nan")) - last,
                "last_to_hl7": acked.get("hl7", float("nan")) - last,
                "complete_to_sr": acked.get("dicom", float("nan")) - complete,
                "complete_to_hl7": acked.get("hl7", float("nan")) - complete,
                "release_to_complete": complete - _ts(released),
            }
        )
    return rows


def _ts(value) -> float:
    if isinstance(value, str):  # SQLite returns text, in UTC
        value = datetime.fromisoformat(value)
    return value.timestamp()


def report(rows: list[dict], *, studies: int) -> None:
    delivered = sum(r["state"] == "delivered" for r in rows)
    print(f"\n{delivered}/{studies} studies delivered to both destinations")
    print("| interval | p50 s | p95 s | max s |")
    print("|---|---|---|---|")
    for key, label in [
        ("last_to_sr", "last instance received -> SR stored in Orthanc"),
        ("last_to_hl7", "last instance received -> HL7 ACK"),
        ("complete_to_sr", "COMPLETE -> SR stored"),
        ("complete_to_hl7", "COMPLETE -> HL7 ACK"),
        ("release_to_complete", "association released -> COMPLETE"),
    ]:
        values = sorted(r[key] for r in rows if r[key] == r[key])  # drop NaN
        if values:
            print(f"| {label} | {statistics.median(values):.2f} | {percentile(values, 95):.2f} | {values[-1]:.2f} |")
    print("Targets: COMPLETE -> both acknowledgements p95 < 3 s; release -> COMPLETE < 3 s.")


def sr_round_trip(orthanc, source_folder: Path, count: int = 50) -> None:
    """An SR C-STORE on an already open association, as the ledger sends while work is queued."""
    import django

    django.setup()
    from django.utils import timezone

    from results.deliver.dicom_send import StoreSession
    from results.deliver.payload import ResultPayload
    from results.deliver.sr import build_sr

    sources = tuple(sorted(source_folder.glob("*.dcm"))[:40])
    from pydicom import dcmread

    first = dcmread(sources[0], stop_before_pixels=True)
    payload = ResultPayload(
        study_instance_uid=first.StudyInstanceUID,
        accession_number="BENCH",
        patient_id="BENCH",
        patient_name="ZZDEMO^BENCH",
        triage_score=0.9,
        finding_flag=True,
        model_name="demo",
        model_version="1",
        identity=identity("bench-sr"),
        created_at=timezone.now(),
        source_instances=sources,
    )
    sr = build_sr(payload)
    with StoreSession(
        calling_ae_title="PACSLENS", host="127.0.0.1", port=orthanc.dicom_port, called_ae_title=orthanc.aet
    ) as session:
        session.store(sr)  # warm-up
        times = []
        for _ in range(count):
            started = time.perf_counter()
            outcome = session.store(sr)
            times.append((time.perf_counter() - started) * 1000)
            assert outcome.ok, outcome.describe()
    times.sort()
    print(
        f"\nSR C-STORE on an open association to Orthanc ({count} stores): p50 {statistics.median(times):.1f} ms, "
        f"p95 {percentile(times, 95):.1f} ms (target p50 <= 10 ms)"
    )


if __name__ == "__main__":
    sys.exit(main())
