"""`manage.py check --deploy` passes with the production settings a site installs.

The env file is the one shipped in deploy/pacslens.env (docs/deployment.md installs it), so the
file and the check cannot drift apart. Only paths are redirected into the test's temp dir; the
database is never connected to.
"""

from __future__ import annotations

import os
import secrets
import subprocess

from tests.support.listener_proc import PYTHON, REPO

ENV_FILE = REPO / "deploy" / "pacslens.env"


def documented_env() -> dict[str, str]:
    env = {}
    for line in ENV_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def check_deploy(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def production_env(tmp_path) -> dict[str, str]:
    documented = documented_env()
    assert {"PACSLENS_SECRET_KEY_FILE", "PACSLENS_HTTPS", "PACSLENS_ALLOWED_HOSTS", "DATABASE_URL"} <= set(documented)
    secret_key = tmp_path / "secret_key"
    secret_key.write_text(secrets.token_urlsafe(48) + "\n")
    metrics_token = tmp_path / "metrics_token"
    metrics_token.write_text(secrets.token_urlsafe(24) + "\n")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    documented.update(
        PACSLENS_DATA_DIR=str(data_dir),
        PACSLENS_SECRET_KEY_FILE=str(secret_key),
        PACSLENS_METRICS_TOKEN_FILE=str(metrics_token),
    )
    # A clean environment, as systemd gives a unit: nothing from the test process leaks in
    # (e.g. DJANGO_ALLOW_ASYNC_UNSAFE, set by the browser tests, is itself a deploy error).
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    env.update(DJANGO_SETTINGS_MODULE="pacslens.settings", **documented)
    return env


def test_the_documented_production_settings_pass_check_deploy(tmp_path):
    done = check_deploy(production_env(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


def test_without_https_check_deploy_fails(tmp_path):
    env = production_env(tmp_path)
    del env["PACSLENS_HTTPS"]
    done = check_deploy(env)
    assert done.returncode != 0
    assert "security.W008" in done.stderr and "SESSION_COOKIE_SECURE" in done.stderr
