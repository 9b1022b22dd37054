"""The real DICOM listener as a subprocess, exactly as deployed (fixtures registered in conftest).

`manage.py dicom_listener` runs in its own process group with a fresh data dir whose SQLite
database is a copy of one migrated once per test session (migrating takes seconds; copying a
file takes milliseconds). The template already allow-lists the calling AE titles dcmtk and
our tests use. Tests talk to it over real sockets and read its database with sqlite3, never
through Django in the test process (whose settings point at another data dir).

Fixtures:
- `listener_factory(processes=1, env={...}, calling_ae_titles=[...])` starts one and returns
  a `ListenerProcess`; every listener still running at teardown is stopped with SIGTERM and
  must exit 0.
- `listener`: one single-process listener with the defaults.

`base_env`, `template_db_create` and `database_migrate` also set up the benchmarks' servers.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.net import free_port, require_program

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
LISTENER_AE_TITLE = "PACSLENS"
# dcmtk's default calling AE titles and the one our pynetdicom SCUs use.
DEFAULT_CALLING_AE_TITLES = ("STORESCU", "ECHOSCU", "PACSLENS_TEST")
DB_NAME = "pacslens.sqlite3"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0

_TEMPLATE_SCRIPT = """
import sys
import django
django.setup()
from django.core.management import call_command
from django.db import connection
from routing.models import ApplicationEntity
call_command("migrate", interactive=False, verbosity=0)
for title in sys.argv[1:]:
    ApplicationEntity.objects.create(ae_title=title, host="127.0.0.1", description="test sender", may_send=True)
connection.close()
"""


def base_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a listener (or any manage.py command) on `data_dir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLENS_") and k != "DATABASE_URL"}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "pacslens.settings",
            "PACSLENS_DATA_DIR": str(data_dir),
            "PACSLENS_SECRET_KEY": "listener-test-key-not-secret-" + "x" * 40,
            "PACSLENS_AE_TITLE": LISTENER_AE_TITLE,
            "PACSLENS_DICOM_HOST": "127.0.0.1",
            "PACSLENS_DISK_FREE_FLOOR_MB": "16",
            "PACSLENS_DICOM_SHUTDOWN_GRACE": "20",
            "PACSLENS_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


def dcmtk_env() -> dict[str, str]:
    """Debian's dcmtk leaves Nagle on unless told: each instance would wait for a delayed ACK."""
    return {**os.environ, "TCP_NODELAY": "1"}


def template_db_create(
    folder: Path, calling_ae_titles: Sequence[str] = DEFAULT_CALLING_AE_TITLES, repo: Path = REPO
) -> Path:
    """Migrate a database once in `folder`, allow-list `calling_ae_titles`, return the DB file.

    `repo`: the checkout whose migrations make the schema (the benchmark's --against baseline)."""
    folder.mkdir(parents=True, exist_ok=True)
    database_migrate(base_env(folder), calling_ae_titles, repo=repo)
    db = folder / DB_NAME
    with sqlite3.connect(db) as conn:  # fold the WAL into the main file so one file copy is complete
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db


def database_migrate(
    env: Mapping[str, str], calling_ae_titles: Sequence[str] = DEFAULT_CALLING_AE_TITLES, repo: Path = REPO
) -> None:
    """Migrate the database `env` points at and allow-list `calling_ae_titles`, in a subprocess."""
    subprocess.run(
        [checkout_python(repo), "-c", _TEMPLATE_SCRIPT, *calling_ae_titles],
        cwd=repo,
        env=dict(env),
        check=True,
        timeout=300,
    )


def checkout_python(repo: Path) -> str:
    """The Python that runs `repo`'s code: this one, or another checkout's own virtualenv."""
    if repo == REPO:
        return PYTHON
    venv = repo / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else PYTHON


def data_dir_create(folder: Path, template_db: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template_db, folder / DB_NAME)
    return folder


@dataclass
class ListenerProcess:
    """One `manage.py dicom_listener` subprocess and read access to its database."""

    data_dir: Path
    port: int
    processes: int = 1
    env: dict[str, str] = field(default_factory=dict)
    ae_title: str = LISTENER_AE_TITLE
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_path: Path | None = None
    repo: Path = REPO  # the checkout whose listener runs (another one: the benchmark's baseline)

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_NAME

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> ListenerProcess:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.log_path = self.data_dir / "listener.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        cmd = [checkout_python(self.repo), "manage.py", "dicom_listener", "--port", str(self.port)]
        cmd += ["--processes", str(self.processes)]
        # Own process group: a SIGKILL "crash" takes the forked workers down with the supervisor.
        self.process = subprocess.Popen(
            cmd, cwd=self.repo, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                raise AssertionError(f"listener exited with {self.process.returncode}:\n{self.log()}")
            if self.echo(calling_ae_title=DEFAULT_CALLING_AE_TITLES[-1]) == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"listener did not answer C-ECHO within {timeout} s:\n{self.log()}")

    def storescu(
        self, paths: Sequence[Path], *options: str, calling_ae_title: str = "STORESCU"
    ) -> subprocess.CompletedProcess[str]:
        """dcmtk's storescu sends `paths` to this listener, as a modality or a PACS would."""
        command = [require_program("storescu"), "-aet", calling_ae_title, "-aec", self.ae_title, *options]
        return subprocess.run(
            [*command, self.host, str(self.port), *map(str, paths)],
            env=dcmtk_env(),
            capture_output=True,
            check=False,
            text=True,
            timeout=120,
        )

    def echo(self, calling_ae_title: str = "PACSLENS_TEST") -> int | None:
        """C-ECHO status from a pynetdicom SCU, or None when no association was established."""
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=calling_ae_title)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 5
        transport_log = logging.getLogger("pynetdicom")
        level = transport_log.level
        transport_log.setLevel(logging.CRITICAL)  # "connection refused" while starting is expected
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        except (OSError, RuntimeError):
            return None
        finally:
            transport_log.setLevel(level)
        if not assoc.is_established:
            return None
        try:
            status = assoc.send_c_echo()
            return int(status.Status) if "Status" in status else None
        finally:
            assoc.release()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait, return the exit code (SIGKILL and fail after `timeout`)."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"listener did not exit {timeout} s after SIGTERM:\n{self.log()}") from None

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, with no chance to clean up."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def pids(self) -> list[int]:
        """The listener's process tree (the supervisor and its forked workers)."""
        import psutil

        if self.process is None or self.process.poll() is not None:
            return []
        try:
            parent = psutil.Process(self.process.pid)
            return [parent.pid, *(c.pid for c in parent.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def log(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-5000:]
        return ""

    # --- database ----------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.db_path, timeout=20)
        try:
            conn.row_factory = sqlite3.Row
            return [dict(row) for row in conn.execute(sql, params)]
        finally:
            conn.close()

    def instances(self) -> list[dict[str, Any]]:
        return self.query(
            "SELECT i.*, s.study_instance_uid FROM routing_instance i JOIN routing_study s ON s.id = i.study_id "
            "ORDER BY i.id"
        )

    def instance_count(self) -> int:
        return self.query("SELECT COUNT(*) AS n FROM routing_instance")[0]["n"]

    def studies(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM routing_study ORDER BY id")

    def associations(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM routing_storeassociation ORDER BY id")

    def instance_path(self, row: Mapping[str, Any]) -> Path:
        return self.data_dir / row["path"]

    def stored_files(self) -> list[Path]:
        folder = self.data_dir / "instances"
        return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []

    def temp_files(self) -> list[Path]:
        folder = self.data_dir / "incoming"
        return sorted(p for p in folder.iterdir() if p.is_file()) if folder.exists() else []

    def query_write(self, sql: str, params: Sequence[Any] = ()) -> None:
        """One statement that changes the database (before `start()`: the listener caches its allow-list)."""
        conn = sqlite3.connect(self.db_path, timeout=20)
        try:
            with conn:
                conn.execute(sql, params)
        finally:
            conn.close()

    def calling_ae_add(self, ae_title: str) -> None:
        """Allow-list another calling AE (copies a template row, so new model columns keep their values).

        The listener re-reads its allow-list every few seconds; call this before `start()`.
        """
        columns = [r["name"] for r in self.query("PRAGMA table_info(routing_applicationentity)") if r["name"] != "id"]
        select = ", ".join("?" if c == "ae_title" else c for c in columns)
        conn = sqlite3.connect(self.db_path, timeout=20)
        try:
            with conn:
                conn.execute(
                    f"INSERT INTO routing_applicationentity ({', '.join(columns)}) "
                    f"SELECT {select} FROM routing_applicationentity ORDER BY id LIMIT 1",
                    (ae_title,),
                )
        finally:
            conn.close()


ListenerFactory = Callable[..., ListenerProcess]


@pytest.fixture(scope="session")
def listener_template_db(tmp_path_factory) -> Path:
    """A migrated database with the default calling AE titles allow-listed, made once per session."""
    return template_db_create(tmp_path_factory.mktemp("listener-template"))


@pytest.fixture
def listener_factory(listener_template_db: Path, tmp_path: Path) -> Iterator[ListenerFactory]:
    started: list[ListenerProcess] = []

    def start(
        *,
        processes: int = 1,
        env: Mapping[str, str] | None = None,
        calling_ae_titles: Sequence[str] = (),
        name: str = "listener",
        run: bool = True,
    ) -> ListenerProcess:
        data_dir = data_dir_create(tmp_path / name, listener_template_db)
        port = free_port()
        proc = ListenerProcess(
            data_dir=data_dir,
            port=port,
            processes=processes,
            env=base_env(data_dir, PACSLENS_DICOM_PORT=str(port), **dict(env or {})),
        )
        for title in calling_ae_titles:
            proc.calling_ae_add(title)
        started.append(proc)
        return proc.start() if run else proc

    yield start

    failures = []
    for proc in started:
        running = proc.process is not None and proc.process.poll() is None
        code = proc.stop()
        if running and code != 0:
            failures.append(f"listener on port {proc.port} exited with {code} after SIGTERM:\n{proc.log()}")
    if failures:
        pytest.fail("\n".join(failures))


@pytest.fixture
def listener(listener_factory: ListenerFactory) -> ListenerProcess:
    return listener_factory()
