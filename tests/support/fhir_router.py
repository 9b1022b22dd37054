"""A real FHIR R4 server for the tests: Medplum's FHIR router and in-memory repository behind a
small Node HTTP server (tests/support/medplum_fhir/server.mjs), so conditional create and
update, search parameters and resource validation are a FHIR implementation's, not ours.

The `fhir_router` fixture is one server for the session, emptied before each test; it needs
`node` and the packages of the committed lock file (`make test` and .ci/run run `npm ci`; the
fixture runs it too when they are missing). Missing node skips here and fails under CI=true.
Fault injection (503, silence, scripted statuses) stays with the stub in fhir_server.py.
"""

from __future__ import annotations

import json
import selectors
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.net import peer_missing, require_program

PROJECT = Path(__file__).resolve().parent / "medplum_fhir"
TOKEN = "router-token"
# Loading and indexing the R4 definitions takes a few seconds on a busy 2-core machine.
STARTUP_TIMEOUT_S = 60
NODE_MINIMUM = (20, 19)  # package.json "engines" of @medplum/fhir-router 4.5


class FHIRRouterPeer:
    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process = process
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def reset(self) -> None:
        self._call("POST", f"http://127.0.0.1:{self.port}/$reset", {})

    def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Store a resource as the RIS would have it (test setup)."""
        return self._call("POST", f"{self.url}/{resource['resourceType']}", resource)

    def search(self, resource_type: str, **params: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode(params)
        bundle = self._call("GET", f"{self.url}/{resource_type}?{query}")
        return [entry["resource"] for entry in bundle.get("entry", [])]

    def count(self, resource_type: str, system: str, value: str) -> int:
        return len(self.search(resource_type, identifier=f"{system}|{value}"))

    def _call(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            url,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


def fhir_router_install() -> None:
    """`npm ci` from the lock file when the packages are not there (a fresh checkout)."""
    if (PROJECT / "node_modules" / "@medplum" / "fhir-router").is_dir():
        return
    npm = require_program("npm")
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=PROJECT, capture_output=True, text=True
    )
    if done.returncode != 0:
        peer_missing(f"npm ci in {PROJECT} failed:\n{done.stderr[-2000:]}")


def fhir_router_start() -> FHIRRouterPeer:
    node = require_program("node")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    if tuple(int(part) for part in version.lstrip("v").split(".")[:2]) < NODE_MINIMUM:
        peer_missing(
            f"node {version} is older than the {'.'.join(map(str, NODE_MINIMUM))} @medplum/fhir-router 4.x needs "
            "(Debian trixie's nodejs, or NodeSource's on bookworm)"
        )
    fhir_router_install()
    process = subprocess.Popen(
        [node, "server.mjs", "--port", "0", "--token", TOKEN],
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    # The first line is "listening <port>" once the definitions are indexed, or the error.
    first = _first_line(process)
    if not first.startswith("listening "):
        process.kill()
        rest = process.stdout.read()[-4000:]
        raise RuntimeError(f"the FHIR router did not start (exit code {process.poll()}): {first}{rest}")
    return FHIRRouterPeer(process, int(first.split()[1]))


def _first_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=STARTUP_TIMEOUT_S):
            return f"no answer in {STARTUP_TIMEOUT_S} s\n"
    return process.stdout.readline()


@pytest.fixture(scope="session")
def fhir_router_session() -> Iterator[FHIRRouterPeer]:
    peer = fhir_router_start()
    try:
        yield peer
    finally:
        peer.process.terminate()
        try:
            peer.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            peer.process.kill()
        if peer.process.stdout:
            peer.process.stdout.close()


@pytest.fixture
def fhir_router(fhir_router_session: FHIRRouterPeer) -> FHIRRouterPeer:
    """The session's FHIR server, empty."""
    fhir_router_session.reset()
    return fhir_router_session
