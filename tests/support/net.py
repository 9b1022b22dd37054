"""Sockets and programs the interop tests need: a free TCP port, an installed peer program.

A missing peer skips the test on a developer machine but fails it under CI=true: CI installs
every peer, so a skip there would hide a broken setup.
"""

from __future__ import annotations

import os
import shutil
import socket
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def peer_missing(message: str) -> NoReturn:
    """Skip the test (developer machine) or fail it (CI) because a peer is not installed."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def require_program(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    peer_missing(f"interop peer {name!r} is not installed (apt-get install it; .ci/run does)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
