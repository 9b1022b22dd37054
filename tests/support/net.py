"""Sockets and programs the interop tests need: a free TCP port, an installed peer program, an
HTTP server that records the headers it was sent.

A missing peer skips the test on a developer machine but fails it under CI=true: CI installs
every peer, so a skip there would hide a broken setup.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import threading
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


class HeaderRecorder:
    """An HTTP server on 127.0.0.1 that answers every request 200 `{}` and keeps its headers:
    what a Test button or a sender really sent, credentials included."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorder.headers.append(dict(self.headers))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_POST = do_PUT = do_OPTIONS = do_GET

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def authorizations(self) -> list[str]:
        return [h.get("Authorization", "") for h in self.headers]


def closed_by_peer(sock: socket.socket, timeout: float = 15.0) -> bool:
    """True when the listener closes the connection (after an A-ABORT, if it sends one)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:  # reset: closed as well
        return True
    return True
