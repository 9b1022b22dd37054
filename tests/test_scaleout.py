"""Scale-out: two worker clusters and two listeners on one database, and a kill -9 of each mid-run.

Everything runs as deployed: two `manage.py dicom_listener --processes 1` commands sharing one
port (SO_REUSEPORT), two `manage.py run_workers` clusters, dcmtk `storescu` senders at once, two
live MLLP receivers as the RIS. Once on SQLite (one machine) and once on PostgreSQL (the
throwaway cluster of tests/support/postgres.py). Checked: nothing acknowledged is lost, every study is
routed, inferred and delivered exactly once, schedules are not duplicated. No timing assertions:
deadlines only bound how long we wait for the pipeline to settle.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from pacslens.demo_study import demo_study_write
from results.inference.demo_model import RULE_NAME
from tests.support.listener_proc import DB_NAME, PYTHON, REPO, base_env, dcmtk_env
from tests.support.mllp import MLLPListener
from tests.support.net import free_port, require_program
from tests.support.postgres import Database, sqlite_url

pytestmark = pytest.mark.interop

SLICES = 8
SIZE = 64
SETTLE_TIMEOUT_S = 150.0
START_TIMEOUT_S = 60.0
SITE_ENV = {
    "PACSLENS_STUDY_RELEASE_GRACE": "0.5",
    # A study whose association died with a killed listener completes by the quiet period.
    "PACSLENS_STUDY_QUIET_PERIOD": "5",
    # Small: a task lost with a killed worker comes back after 3 × this, a study stuck
    # inferring is re-run after 1.5 × this.
    "PACSLENS_TASK_TIMEOUT": "10",
    "PACSLENS_WORKERS": "2",
    "PACSLENS_INFERENCE_INTRA_OP_THREADS": "1",
}
DESTINATIONS = """\
pacslens_config: 1
destinations:
{entries}
"""
DESTINATION = """\
- name: {name}
  kind: hl7
  host: 127.0.0.1
  port: {port}
  hl7_message_type: ORU^R01
  rules: ['{rule}']
  timeout_seconds: 1
  max_attempts: 20
  backoff_base_seconds: 0.5
  backoff_cap_seconds: 2
"""


@dataclass
class Proc:
    """One PacsLens command in its own process group."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 60.0) -> int:
        if not self.running():
            return self.popen.returncode
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
            return -9

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


@dataclass
class Site:
    """A data dir, a database and the processes sharing them."""

    data_dir: Path
    database_url: str | None  # None: the SQLite default in the data dir
    port: int
    procs: list[Proc] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        extra = {"DATABASE_URL": self.database_url} if self.database_url else {}
        return base_env(self.data_dir, PACSLENS_DICOM_PORT=str(self.port), **SITE_ENV, **extra)

    @property
    def db(self) -> Database:
        return Database(self.database_url or sqlite_url(self.data_dir / DB_NAME))

    def manage(self, *args: str) -> None:
        done = subprocess.run(
            [PYTHON, "manage.py", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert done.returncode == 0, f"manage.py {' '.join(args)}: {done.stderr[-3000:]}"

    def start(self, name: str, *args: str, role: str) -> Proc:
        log_path = self.data_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                [PYTHON, "manage.py", *args],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        # Ready once its heartbeat row exists: written after the listener's socket is bound,
        # and after the worker cluster started.
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.db.query(
            "SELECT id FROM routing_heartbeat WHERE role = %s AND identity LIKE %s", (role, f"%:{popen.pid}")
        ):
            assert proc.running(), f"{name} exited with {popen.returncode}:\n{proc.log()}"
            assert time.monotonic() < deadline, f"{name} did not start within {START_TIMEOUT_S} s:\n{proc.log()}"
            time.sleep(0.2)
        return proc

    def listener_start(self, name: str) -> Proc:
        return self.start(name, "dicom_listener", "--port", str(self.port), "--processes", "1", role="listener")

    def workers_start(self, name: str) -> Proc:
        return self.start(name, "run_workers", role="workers")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log()}" for p in self.procs)


@pytest.fixture(params=["sqlite", "postgres"])
def site(request, tmp_path, listener_template_db) -> Iterator[Site]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if request.param == "postgres":
        cluster = request.getfixturevalue("postgres_cluster")
        template = request.getfixturevalue("postgres_template_url").rsplit("/", 1)[1]
        url = cluster.database_create(f"scaleout_{os.getpid()}_{free_port()}", template=template)
    else:
        shutil.copyfile(listener_template_db, data_dir / DB_NAME)
        url = None
    site = Site(data_dir=data_dir, database_url=url, port=free_port())
    yield site
    failures = []
    for proc in site.procs:
        was_running = proc.running()
        code = proc.stop()
        if was_running and code != 0:
            failures.append(f"{proc.name} exited with {code} after SIGTERM:\n{proc.log()}")
    if failures:
        pytest.fail("\n".join(failures))


@pytest.fixture
def ris() -> Iterator[list[MLLPListener]]:
    servers = [MLLPListener(), MLLPListener()]
    yield servers
    for server in servers:
        server.stop()


def test_two_listeners_and_two_worker_clusters_survive_a_kill_and_do_everything_once(site, ris, tmp_path):
    storescu = require_program("storescu")
    site.manage("setup_site")
    config = tmp_path / "destinations.yaml"
    config.write_text(
        DESTINATIONS.format(
            entries="".join(
                DESTINATION.format(name=f"ris-{i}", port=server.port, rule=RULE_NAME) for i, server in enumerate(ris)
            )
        )
    )
    site.manage("import_config", str(config))
    listeners = [site.listener_start("listener-1"), site.listener_start("listener-2")]
    started = time.monotonic()
    workers = [site.workers_start("workers-1"), site.workers_start("workers-2")]

    studies = {f"A{i}": demo(tmp_path / f"A{i}", seed=i, lesion=i == 0) for i in range(8)}
    split = two_series_study(tmp_path / "S", seed=20)  # one study, two series, two associations at once
    held = demo(tmp_path / "H", seed=30)
    late = {f"B{i}": demo(tmp_path / f"B{i}", seed=40 + i) for i in range(2)}

    # Phase 1: six storescu senders at once (two studies each, or one series of the split study),
    # while a seventh association stores half of study H and then stays open.
    names = list(studies)
    batches = [studies[a] + studies[b] for a, b in zip(names[::2], names[1::2])] + split
    senders = [storescu_start(storescu, site.port, paths) for paths in batches]
    acked, association = store_half(site.port, held)
    assert len(acked) == SLICES // 2

    # Kill -9 the listener holding H's open association and one worker cluster, mid-run.
    holder = site.db.query(
        "SELECT DISTINCT a.listener FROM routing_storeassociation a JOIN routing_instance i ON i.association_id = a.id "
        "WHERE i.sop_instance_uid = %s",
        (acked[0],),
    )[0]["listener"]
    [victim] = [p for p in listeners if holder.endswith(f":{p.pid}")]
    victim.kill9()
    workers[0].kill9()
    assert not store_rest(association, held), "a killed listener acknowledged an instance"

    # Nothing acknowledged is lost: H's first half is recorded and on disk.
    rows = site.db.query(
        "SELECT sop_instance_uid, path FROM routing_instance WHERE sop_instance_uid IN "
        f"({', '.join(['%s'] * len(acked))})",
        acked,
    )
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(acked)
    assert all((site.data_dir / r["path"]).is_file() for r in rows)

    # A sender cut off by the kill sends again, as a PACS does; so does H's sender, in full.
    for paths, sender in zip(batches, senders):
        if sender.wait(120) != 0:
            storescu_run(storescu, site.port, paths)
    storescu_run(storescu, site.port, held)
    # Phase 2: new studies reach the surviving listener and worker cluster.
    for paths in late.values():
        storescu_run(storescu, site.port, paths)

    expected = {**studies, "S": split[0] + split[1], "H": held, **late}
    uids = {name: study_uid(paths[0]) for name, paths in expected.items()}
    rows = wait_delivered(site, list(uids.values()))

    # Every instance sent is stored exactly once, with its file.
    for name, paths in expected.items():
        study = rows[uids[name]]
        stored = site.db.query(
            "SELECT sop_instance_uid, path FROM routing_instance WHERE study_id = %s", (study["id"],)
        )
        assert sorted(r["sop_instance_uid"] for r in stored) == sorted(sop_uid(p) for p in paths), name
        assert all((site.data_dir / r["path"]).is_file() for r in stored), name

    # Completed, routed, inferred and delivered once each.
    for name, study in ((n, rows[uids[n]]) for n in expected):
        events = site.db.query("SELECT kind, to_state FROM routing_studyevent WHERE study_id = %s", (study["id"],))
        moves = Counter(e["kind"] for e in events if e["kind"] == e["to_state"])  # plain state changes
        assert moves["complete"] == moves["routed"] == moves["inferred"] == moves["delivered"] == 1, (name, events)
        assert not any(e["kind"] == "amended" for e in events), name
        assert site.db.scalar("SELECT COUNT(*) FROM routing_routingdecision WHERE study_id = %s", (study["id"],)) == 1
        results = site.db.query(
            "SELECT model_name, status FROM results_inferenceresult WHERE study_id = %s", (study["id"],)
        )
        assert [r["status"] for r in results] == ["succeeded"], (name, results)

    # Each delivery reached its RIS; a message is repeated only when its worker died holding it
    # (the same MSH-10 again, so the RIS keeps one).
    deliveries = site.db.query(
        "SELECT d.id, d.idempotency_key, d.state, dest.port FROM results_delivery d "
        "JOIN results_destination dest ON dest.id = d.destination_id"
    )
    assert len(deliveries) == 2 * len(expected)
    assert {d["state"] for d in deliveries} == {"delivered"}
    for server in ris:
        keys = [d["idempotency_key"] for d in deliveries if d["port"] == server.port]
        assert sorted(set(server.received)) == sorted(keys)
        for key, count in Counter(server.received).items():
            if count > 1:
                [delivery] = [d for d in deliveries if d["idempotency_key"] == key]
                lease_expired = site.db.scalar(
                    "SELECT COUNT(*) FROM results_deliveryattempt WHERE delivery_id = %s AND message LIKE %s",
                    (delivery["id"], "%lease expired%"),
                )
                assert lease_expired == count - 1, (key, count)

    # Two clusters ensured and ran the schedules: one row per schedule, and no schedule ran more
    # often than its one-minute period allows since the first cluster started.
    names = [r["name"] for r in site.db.query("SELECT name FROM django_q_schedule WHERE name LIKE %s", ("pacslens:%",))]
    assert names and len(names) == len(set(names))
    runs = Counter(
        r["group"] for r in site.db.query('SELECT "group" FROM django_q_task WHERE "group" LIKE %s', ("pacslens:%",))
    )
    assert runs["pacslens:pacslens.ops.heartbeat.tasks_heartbeat"] >= 1
    assert max(runs.values()) <= 1 + int((time.monotonic() - started) // 60), runs

    # The survivors still stop cleanly (the fixture checks exit codes).
    assert [p.running() for p in listeners] == [p is not victim for p in listeners]
    assert [p.running() for p in workers] == [False, True], site.logs()


def test_concurrent_associations_to_two_listeners_create_each_study_once(site, tmp_path):
    """Every series of a study in its own association, all at once, spread over both listeners:
    whoever inserts the Study row first, the others use it and every instance is acknowledged."""
    storescu = require_program("storescu")
    site.listener_start("listener-1")
    site.listener_start("listener-2")
    studies = [series_split(tmp_path / f"S{i}", seed=60 + i, series=6) for i in range(3)]
    for series in studies:
        senders = [storescu_start(storescu, site.port, paths) for paths in series]
        assert [sender.wait(120) for sender in senders] == [0] * len(senders)
    for series in studies:
        uid = study_uid(series[0][0])
        [study] = site.db.query("SELECT id FROM routing_study WHERE study_instance_uid = %s", (uid,))
        assert site.db.scalar("SELECT COUNT(*) FROM routing_series WHERE study_id = %s", (study["id"],)) == len(series)
        stored = site.db.query("SELECT sop_instance_uid FROM routing_instance WHERE study_id = %s", (study["id"],))
        assert sorted(r["sop_instance_uid"] for r in stored) == sorted(sop_uid(p) for paths in series for p in paths)
        receiving = site.db.scalar(
            "SELECT COUNT(*) FROM routing_studyevent WHERE study_id = %s AND kind = 'receiving'", (study["id"],)
        )
        assert receiving == 1
    listeners_used = site.db.scalar("SELECT COUNT(DISTINCT listener) FROM routing_storeassociation")
    assert listeners_used in (1, 2)  # the kernel spreads connections by hash: usually both


# --- helpers ----------------------------------------------------------------------------------


def demo(folder: Path, *, seed: int, lesion: bool = False) -> list[Path]:
    return demo_study_write(outdir=folder, slices=SLICES, size=SIZE, seed=seed, lesion=lesion).paths


def two_series_study(folder: Path, *, seed: int) -> list[list[Path]]:
    """A study of two series (copies with new series and instance UIDs), one list per series."""
    first = demo(folder / "1", seed=seed)
    second_folder = folder / "2"
    second_folder.mkdir(parents=True)
    series_uid = generate_uid()
    second = []
    for path in first:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(second_folder / path.name, enforce_file_format=True)
        second.append(second_folder / path.name)
    return [first, second]


def series_split(folder: Path, *, seed: int, series: int) -> list[list[Path]]:
    """One study of `series` series of 2 slices each (one list of files per series)."""
    paths = demo_study_write(outdir=folder, slices=2 * series, size=SIZE, seed=seed).paths
    split = []
    for index in range(series):
        series_uid = generate_uid()
        for path in paths[2 * index : 2 * index + 2]:
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = index + 1
            ds.save_as(path, enforce_file_format=True)
        split.append(paths[2 * index : 2 * index + 2])
    return split


def study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def storescu_start(program: str, port: int, paths: list[Path]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [program, "-aet", "STORESCU", "-aec", "PACSLENS", "127.0.0.1", str(port), *map(str, paths)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def storescu_run(program: str, port: int, paths: list[Path]) -> None:
    done = subprocess.run(
        [program, "-aet", "STORESCU", "-aec", "PACSLENS", "127.0.0.1", str(port), *map(str, paths)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def store_half(port: int, paths: list[Path]):
    """Open an association, store the first half of `paths`; return the acknowledged SOP Instance
    UIDs and the association, left open."""
    from pynetdicom import AE

    ae = AE(ae_title="PACSLENS_TEST")
    ae.add_requested_context(pydicom.dcmread(paths[0], stop_before_pixels=True).SOPClassUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    association = ae.associate("127.0.0.1", port, ae_title="PACSLENS")
    assert association.is_established
    acked = []
    for path in paths[: len(paths) // 2]:
        ds = pydicom.dcmread(path)
        status = association.send_c_store(ds)
        if "Status" in status and status.Status == 0:
            acked.append(str(ds.SOPInstanceUID))
    return acked, association


def store_rest(association, paths: list[Path]) -> list[str]:
    """Try the second half on the (now dead) association; return what was acknowledged."""
    acked = []
    for path in paths[len(paths) // 2 :]:
        if not association.is_established:
            break
        ds = pydicom.dcmread(path)
        try:
            status = association.send_c_store(ds)
        except (RuntimeError, OSError):
            break
        if "Status" in status and status.Status == 0:
            acked.append(str(ds.SOPInstanceUID))
    association.abort()
    return acked


def wait_delivered(site: Site, study_uids: list[str]) -> dict[str, dict]:
    """Each study's row once every one is delivered (or the deadline passed: then fail with logs)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    rows: dict[str, dict] = {}
    while time.monotonic() < deadline:
        rows = {
            r["study_instance_uid"]: r for r in site.db.query("SELECT id, study_instance_uid, state FROM routing_study")
        }
        if all(uid in rows and rows[uid]["state"] == "delivered" for uid in study_uids):
            return rows
        time.sleep(0.5)
    states = {uid: rows.get(uid, {}).get("state") for uid in study_uids}
    raise AssertionError(f"not all delivered within {SETTLE_TIMEOUT_S} s: {states}\n{site.logs()}")
