"""The files a site installs from deploy/ are valid as shipped: the systemd units pass
`systemd-analyze verify`, the nginx site passes `nginx -t` (Debian's nginx), and what they run
exists. Only the install prefix and the certificate and log paths are redirected to what this
checkout and the test's temp dir have. Without the tools a developer machine skips; CI fails.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests.support.certs import ca_make, leaf_make
from tests.support.listener_proc import REPO
from tests.support.net import require_program

DEPLOY = REPO / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
NGINX_SITE = DEPLOY / "nginx" / "pacslens"
INSTALL_PREFIX = "/opt/pacslens"


def installed_here(unit_text: str) -> str:
    return unit_text.replace(f"{INSTALL_PREFIX}/.venv", sys.prefix).replace(INSTALL_PREFIX, str(REPO))


def test_the_three_services_are_shipped():
    assert [u.name for u in UNITS] == [
        "pacslens-listener.service",
        "pacslens-web.service",
        "pacslens-workers.service",
    ]


def test_systemd_verifies_the_units(tmp_path):
    analyze = require_program("systemd-analyze")
    # The units as installed under /opt/pacslens, pointed at this checkout and the virtualenv
    # running the tests (it has gunicorn).
    for unit in UNITS:
        (tmp_path / unit.name).write_text(installed_here(unit.read_text()))
    done = subprocess.run(
        [analyze, "verify", *sorted(str(p) for p in tmp_path.glob("*.service"))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # An unknown key or a bad value is only a warning to systemd: any word from it fails here.
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_a_mistake_in_a_unit_is_caught(tmp_path):
    analyze = require_program("systemd-analyze")
    unit = tmp_path / "pacslens-web.service"
    unit.write_text(installed_here(UNITS[1].read_text()).replace("KillMode=", "KilMode="))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    assert "Unknown key 'KilMode'" in done.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_each_unit_runs_a_command_of_this_release(unit):
    text = unit.read_text()
    joined = text.replace("\\\n", " ")  # continuation lines
    command = shlex.split(re.search(r"^ExecStart=(.*)$", joined, flags=re.MULTILINE)[1])
    assert command[0].startswith(f"{INSTALL_PREFIX}/.venv/bin/")
    if command[1:2] == ["manage.py"]:
        name = command[2]
        assert (REPO / "pacslens" / "management" / "commands" / f"{name}.py").exists() or (
            REPO / "routing" / "management" / "commands" / f"{name}.py"
        ).exists(), name
    else:
        assert command[0].endswith("/gunicorn") and command[1] == "pacslens.wsgi:application"
    assert "EnvironmentFile=/etc/pacslens/pacslens.env" in text and "User=pacslens" in text


def test_nginx_accepts_the_site(tmp_path):
    nginx = require_program("nginx")
    ca = ca_make(tmp_path, "hospital-ca")
    server = leaf_make(tmp_path, "pacslens-host", ca)
    site = (
        NGINX_SITE.read_text()
        .replace("/etc/ssl/certs/pacslens.hospital.example.pem", str(server.cert))
        .replace("/etc/ssl/private/pacslens.hospital.example.key", str(server.key))
        .replace("/var/log/nginx/", f"{tmp_path}/")
    )
    (tmp_path / "pacslens").write_text(site)
    # Debian's nginx.conf includes sites-enabled/* inside its http block: the same here.
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n    include /etc/nginx/mime.types;\n    include {tmp_path}/pacslens;\n}}\n"
    )
    done = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "[warn]" not in done.stderr and "[emerg]" not in done.stderr, done.stderr


def test_the_deployment_guide_installs_these_files():
    guide = (REPO / "docs" / "deployment.md").read_text()
    for shipped in [*UNITS, NGINX_SITE, DEPLOY / "pacslens.env"]:
        assert str(shipped.relative_to(REPO)) in guide or f"deploy/{shipped.parent.name}/" in guide, shipped.name


def requirement_names(path) -> set[str]:
    lines = (REPO / path).read_text().splitlines()
    return {
        re.split(r"[=<>\[ ]", line.strip(), maxsplit=1)[0].lower()
        for line in lines
        if line.strip() and not line.startswith("#")
    }


def test_a_server_installs_no_test_tools():
    runtime, dev = requirement_names("requirements.txt"), requirement_names("requirements-dev.txt")
    assert {"pytest", "pytest-django", "playwright", "hypothesis"} <= dev
    assert not runtime & dev
    # and nothing that runs imports them
    for package in ("pacslens", "routing", "results"):
        for module in (REPO / package).rglob("*.py"):
            imports = re.findall(
                r"^\s*(?:from|import) (pytest|playwright|hypothesis)\b", module.read_text(), re.MULTILINE
            )
            assert not imports, module
