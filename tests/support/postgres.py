"""A throwaway PostgreSQL cluster per test session (fixtures registered in conftest).

Debian's `postgresql` package ships `initdb` and `pg_ctl` under /usr/lib/postgresql/<v>/bin.
We run them on a free port with the data and the socket in a temp dir, so no system service,
no shared state and nothing left behind. PostgreSQL refuses to run as root: as root (CI) the
cluster runs as the `postgres` OS user the package creates (`runuser -u postgres --`); as
anyone else, as that user. Authentication is `trust` on 127.0.0.1 only.

Fixtures:
- `postgres_cluster` (session): the running cluster; `.database_create(name, template=...)`
  returns a DATABASE_URL. Skipped without PostgreSQL on a developer machine, a failure under
  CI=true.
- `postgres_template_url` (session): a database migrated once, with the calling AE titles the
  tests use allow-listed; `CREATE DATABASE ... TEMPLATE` copies it in milliseconds.

`Database(url)` reads either backend from the test process with plain SQL (`%s` placeholders),
never through Django, whose settings point elsewhere.

`python -m tests.support.postgres` starts a cluster, prints its DATABASE_URL and runs until Ctrl-C:
handy for running the whole suite against PostgreSQL (`DATABASE_URL=... pytest`).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.support.listener_proc import base_env, database_migrate
from tests.support.net import free_port, peer_missing

SUPERUSER = "pacslens"
START_TIMEOUT_S = 60.0
INSTALL_HINT = "PostgreSQL is not installed (apt-get install postgresql; .ci/run does)"


def postgres_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin that has initdb, or None."""
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PostgresCluster:
    """One private PostgreSQL server: `start()`, `database_create()`, `stop()`.

    `durable=False` (tests) turns fsync off: a crashed test cluster is thrown away anyway.
    Benchmarks keep the defaults so their figures mean something.
    """

    bindir: Path
    port: int
    durable: bool = False
    root: Path = field(init=False)
    run_as: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        # /tmp itself, not tempfile's default: a test may have pointed that into its own 0700 dir,
        # where the postgres user cannot go.
        base = "/tmp" if os.path.isdir("/tmp") else None
        self.root = Path(tempfile.mkdtemp(prefix="pacslens-pg-", dir=base))
        if os.geteuid() == 0:
            self.run_as = "postgres"
            owner = pwd.getpwnam(self.run_as)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def start(self) -> PostgresCluster:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )
        settings = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.root}'",
            # Two run_workers clusters, two listeners with a thread (and connection) per
            # association, the test process and its pytest-django database: room for all.
            "max_connections = 300",
            "shared_buffers = 128MB",
        ]
        if not self.durable:
            settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# pacslens test cluster\n" + "\n".join(settings) + "\n")
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", str(int(START_TIMEOUT_S)), "start"
        )
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgres://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def database_create(self, name: str, *, template: str | None = None) -> str:
        """CREATE DATABASE `name` (a copy of `template` when given); returns its URL."""
        import psycopg

        sql = f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql)
        return self.url(name)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.root, check=False)
        if done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr + self.log())


def postgres_cluster_start(*, durable: bool = False) -> PostgresCluster:
    """Start a private cluster (raises RuntimeError with the install hint when there is no PostgreSQL)."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError(INSTALL_HINT)
    cluster = PostgresCluster(bindir=bindir, port=free_port(), durable=durable)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        peer_missing("psycopg is not installed (pip install -r requirements.txt)")
    if postgres_bindir() is None:
        peer_missing(INSTALL_HINT)
    cluster = postgres_cluster_start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def postgres_template_url(postgres_cluster: PostgresCluster) -> str:
    """A migrated database with the default calling AE titles allow-listed, made once per session."""
    url = postgres_cluster.database_create("pacslens_template")
    folder = Path(tempfile.mkdtemp(prefix="pacslens-pg-template-"))
    try:
        database_migrate(base_env(folder, DATABASE_URL=url))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return url


# --- reading either database from the test process ---------------------------------------------


@dataclass(frozen=True)
class Database:
    """Plain-SQL access to a PacsLens database: `sqlite:////abs/path` or `postgres://...`.

    Write queries with `%s` placeholders; they become `?` for SQLite.
    """

    url: str

    @property
    def is_postgres(self) -> bool:
        return self.url.startswith(("postgres://", "postgresql://"))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        if self.is_postgres:
            import psycopg
            from psycopg.rows import dict_row

            with psycopg.connect(self.url, row_factory=dict_row, autocommit=True) as conn:
                return list(conn.execute(sql, params))
        conn = sqlite3.connect(urlparse(self.url).path, timeout=20)
        try:
            conn.row_factory = sqlite3.Row
            return [dict(row) for row in conn.execute(sql.replace("%s", "?"), params)]
        finally:
            conn.close()

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self.query(sql, params)
        return next(iter(rows[0].values())) if rows else None


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def database_url_of(database: dict[str, Any]) -> str:
    """A DATABASE_URL for a Django DATABASES entry (e.g. pytest-django's test database), so a
    subprocess (gunicorn, a listener) works on the same database as the test, on either backend."""
    from urllib.parse import quote

    if "postgresql" in database["ENGINE"]:
        user = quote(database.get("USER") or "", safe="")
        password = quote(database.get("PASSWORD") or "", safe="")
        credentials = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        host = database.get("HOST") or "localhost"
        port = f":{database['PORT']}" if database.get("PORT") else ""
        return f"postgres://{credentials}{host}{port}/{database['NAME']}"
    return f"sqlite:///{database['NAME']}"


if __name__ == "__main__":
    cluster = postgres_cluster_start()
    url = cluster.database_create("pacslens")
    print(f"DATABASE_URL={url}", flush=True)
    print(f"(data in {cluster.root}; Ctrl-C stops and removes it)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        cluster.stop()
