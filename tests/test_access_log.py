"""The web server's access log never holds a query string: a study search puts the accession
number in `q=`. Runs gunicorn with the exact arguments of the Procfile and of the systemd unit
shipped in deploy/systemd/, so neither can drift back to logging `%(r)s`."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.support.listener_proc import PYTHON, REPO
from tests.support.net import free_port

ACCESSION = "ACC20260042"


def procfile_args() -> list[str]:
    [line] = [line for line in (REPO / "Procfile").read_text().splitlines() if line.startswith("web:")]
    return shlex.split(line.removeprefix("web:"))[1:]  # without the gunicorn program itself


def systemd_unit_args() -> list[str]:
    text = (REPO / "deploy" / "systemd" / "pacslens-web.service").read_text()
    match = re.search(r"^ExecStart=\S+/gunicorn ((?:.*\\\n)*.*)$", text, flags=re.MULTILINE)
    assert match, "no gunicorn ExecStart in deploy/systemd/pacslens-web.service"
    # systemd joins continued lines and turns %% into %.
    return shlex.split(match.group(1).replace("\\\n", " ").replace("%%", "%"))


def run_gunicorn(args: list[str], tmp_path) -> str:
    """Start gunicorn with `args` (its bind and worker count made local), GET a search URL,
    and return what it wrote to stdout (the access log, `--access-logfile -`)."""
    port = free_port()
    args = list(args)
    args[args.index("--bind") + 1] = f"127.0.0.1:{port}"
    args[args.index("--workers") + 1] = "1"
    env = {
        **os.environ,
        "PACSLENS_DATA_DIR": str(tmp_path),
        "PACSLENS_ALLOWED_HOSTS": "127.0.0.1",
        "DJANGO_SETTINGS_MODULE": "pacslens.settings",
    }
    process = subprocess.Popen(
        [PYTHON, "-m", "gunicorn", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/studies/?q={ACCESSION}&sort=-received"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except urllib.error.HTTPError:
                break  # answered (a redirect to the login page or an error): it is logged
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("gunicorn did not start")
                time.sleep(0.1)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    return output.decode(errors="replace")


@pytest.mark.parametrize("args", [procfile_args, systemd_unit_args], ids=["Procfile", "systemd unit"])
def test_the_access_log_has_the_path_but_not_the_query(args, tmp_path):
    log = run_gunicorn(args(), tmp_path)
    lines = [line for line in log.splitlines() if "/studies/" in line]
    assert lines, f"no access log line for the request in: {log[-2000:]}"
    assert ACCESSION not in log and "q=" not in log
    assert " GET /studies/ HTTP/1.1 " in lines[0]
