"""Shared test fixtures.

Interop tests talk to real programs (dcmtk, Orthanc). `require_program` skips when one is
missing on a developer machine, but under CI=true a missing peer is a failure: CI installs them.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest

pytest_plugins = ["tests.peers", "tests.listener_proc", "tests.postgres"]

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_program(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    message = f"interop peer {name!r} is not installed (apt-get install it; .ci/run does)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def data_dir(settings, tmp_path):
    """A private PACSLENS_DATA_DIR for the test."""
    path = tmp_path / "data"
    path.mkdir()
    settings.DATA_DIR = path
    return path
