"""The production web server (gunicorn, one worker) on the test database, for tests that speak
real HTTP to the site: the `gunicorn` fixture yields its base URL.

`gunicorn_run` is the same as a context manager; `collectstatic=True` first collects the static
files into the data dir as `make run` does (the manifest storage needs them for pages).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.net import free_port
from tests.support.postgres import database_url_of

REPO = Path(__file__).resolve().parent.parent.parent


@contextmanager
def gunicorn_run(*, data_dir: Path, database: dict, collectstatic: bool = False) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "PACSLENS_DATA_DIR": str(data_dir),
        "PACSLENS_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DATABASE_URL": database_url_of(database),
        "DJANGO_SETTINGS_MODULE": "pacslens.settings",
    }
    if collectstatic:
        subprocess.run(
            [sys.executable, "manage.py", "collectstatic", "--noinput", "--verbosity", "0"],
            cwd=REPO,
            env=env,
            check=True,
        )
    log_path = data_dir / "gunicorn.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "pacslens.wsgi:application",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "1",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=2).read()
            break
        except urllib.error.HTTPError:
            break  # it answers (healthz may report other processes missing): the server is up
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"gunicorn did not start: {log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
    try:
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture
def gunicorn(transactional_db, data_dir, settings) -> Iterator[str]:
    """The production web server on the test database: it de-chunks chunked request bodies."""
    with gunicorn_run(data_dir=data_dir, database=settings.DATABASES["default"]) as url:
        yield url
