"""Orthanc as the hospital PACS: a real peer for the test suite and the benchmarks.

The `orthanc` fixture (registered in conftest) is one Orthanc per test session (Debian `orthanc` + `orthanc-dicomweb`) on free
ports with a throwaway config and storage dir: a real PACS for C-STORE/C-FIND/C-MOVE/C-GET and
STOW/QIDO/WADO tests. Tests that need a clean PACS call `orthanc.clear()`; tests that need
Orthanc to know a remote AE (for C-MOVE destinations, say) call `orthanc.add_modality(...)`.
Benchmarks start their own with `orthanc_start(root, program=..., plugin=dicomweb_plugin())`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.net import free_port, peer_missing, require_program

ORTHANC_AET = "ORTHANC"
# Debian installs the plugin here; `dpkg -L orthanc-dicomweb` lists it.
DICOMWEB_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
STARTUP_TIMEOUT_S = 30.0


@dataclass
class OrthancPeer:
    aet: str
    host: str
    dicom_port: int
    http_port: int
    storage_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The STOW/QIDO/WADO root (`{dicomweb_url}/studies`)."""
        return f"{self.http_url}/dicom-web"

    def rest(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """Call Orthanc's REST API; JSON in and out unless `raw` is given."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(
            self.http_url + path,
            data=data,
            method=method,
            headers={"Content-Type": content_type} if data is not None else {},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            return payload

    def rest_get(self, path: str) -> Any:
        return self.rest("GET", path)

    def upload(self, dicom: bytes | Path) -> dict[str, Any]:
        """Store one Part 10 file through the REST API (not DIMSE), for test setup."""
        raw = dicom.read_bytes() if isinstance(dicom, Path) else dicom
        return self.rest("POST", "/instances", raw=raw, content_type="application/dicom")

    def clear(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for patient_id in self.rest_get("/patients"):
            self.rest("DELETE", f"/patients/{patient_id}")

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Teach Orthanc a remote AE (C-MOVE destination, C-STORE target, C-ECHO peer)."""
        self.rest("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def find_instances(self, query: dict[str, str], level: str = "Instance") -> list[dict[str, Any]]:
        """`/tools/find` with expanded answers; `query` uses DICOM keywords (StudyInstanceUID)."""
        return self.rest("POST", "/tools/find", {"Level": level, "Query": query, "Expand": True})

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """The instance as DICOM JSON-ish `simplified-tags` (keyword → value, nested lists)."""
        return self.rest_get(f"/instances/{orthanc_id}/simplified-tags")

    def instance_count(self) -> int:
        return int(self.rest_get("/statistics")["CountInstances"])


def dicomweb_plugin() -> Path | None:
    """The installed orthanc-dicomweb plugin, or None."""
    for directory in DICOMWEB_PLUGIN_DIRS:
        for candidate in sorted(Path(directory).glob("libOrthancDicomWeb.so*")):
            return candidate
    return None


def _wait_until_up(peer: OrthancPeer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if peer.process.poll() is not None:
            break
        try:
            peer.rest_get("/system")
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    log = peer.log_path.read_text(errors="replace")[-4000:] if peer.log_path.exists() else ""
    raise RuntimeError(f"Orthanc did not start (exit code {peer.process.poll()}):\n{log}")


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    """A running Orthanc with DICOMweb, for the whole session."""
    program = require_program("Orthanc")
    plugin = dicomweb_plugin()
    if plugin is None:
        peer_missing("orthanc-dicomweb is not installed (apt-get install orthanc-dicomweb)")
    peer = orthanc_start(tmp_path_factory.mktemp("orthanc"), program=program, plugin=plugin)
    try:
        yield peer
    finally:
        orthanc_stop(peer)


def orthanc_start(root: Path, *, program: str, plugin: Path, config: Mapping[str, Any] | None = None) -> OrthancPeer:
    """Start Orthanc with DICOMweb on free ports under `root` and wait until it answers
    (the session fixture and the benchmarks both use it); `config` overrides settings."""
    storage = root / "storage"
    storage.mkdir(parents=True)
    dicom_port, http_port = free_port(), free_port()
    settings = {
        "Name": "pacslens-test-orthanc",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "DicomAet": ORTHANC_AET,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": True,
        "AuthenticationEnabled": False,
        # Accept associations and stores from any AE: tests use many calling AE titles.
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomModalities": {},
        # Allow tests to add C-MOVE destinations at run time through PUT /modalities/NAME.
        "DicomModalitiesInDatabase": False,
        "Plugins": [str(plugin)],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        },
        "StableAge": 1,
        "HttpTimeout": 30,
        "DicomScuTimeout": 10,
        "ConcurrentJobs": 2,
        "SaveJobs": False,
        **(config or {}),
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(settings, indent=2))
    log_path = root / "orthanc.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [program, "--no-jobs", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # DCMTK (Orthanc's DICOM stack) disables Nagle only when TCP_NODELAY is set in
            # its environment; without it every DIMSE round trip, even a C-ECHO, took ~44 ms
            # here instead of ~2.5 ms (and a CT C-STORE ~48 ms instead of ~4 ms).
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    peer = OrthancPeer(
        aet=ORTHANC_AET,
        host="127.0.0.1",
        dicom_port=dicom_port,
        http_port=http_port,
        storage_dir=storage,
        log_path=log_path,
        process=process,
    )
    try:
        _wait_until_up(peer)
    except Exception:
        orthanc_stop(peer)
        raise
    return peer


def orthanc_stop(peer: OrthancPeer) -> None:
    peer.process.send_signal(signal.SIGTERM)
    try:
        peer.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        peer.process.kill()
        peer.process.wait()
    shutil.rmtree(peer.storage_dir, ignore_errors=True)
