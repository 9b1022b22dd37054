"""A RIS for the tests: an MLLP listener that parses HL7 v2 strictly and answers as told.

`mllp_frame_read` reads one framed message, for the tests' other receivers.
`MLLPListener(port=...)` brings a RIS back where it was after a test took it down; the
`mllp` fixture (registered in conftest) is one on a free port, stopped at teardown.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from tests.support.net import free_port


class MLLPListener:
    """A threaded MLLP server that parses each message with hl7apy and answers per `mode`:
    an ACK code (AA/AE/AR/CA/CE/CR), "wrong-id" (AA for another MSH-10), "silent" (no
    answer until teardown) or "close" (hang up)."""

    def __init__(self, port: int | None = None) -> None:
        self.mode = "AA"
        self.received: list[str] = []  # MSH-10 of every message parsed
        self.messages: list[str] = []  # and the message itself (ER7), in the same order
        self.release = threading.Event()
        listener = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                framed = mllp_frame_read(self.request)
                if framed is None:
                    return
                assert framed.startswith(b"\x0b")
                er7 = framed[1:-2].decode("utf-8")
                message = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
                control_id = message.msh.msh_10.value
                listener.received.append(control_id)
                listener.messages.append(er7)
                mode = listener.mode
                if mode == "silent":
                    listener.release.wait(30)
                    return
                if mode == "close":
                    return
                code, acked = ("AA", "SOMEONE-ELSE") if mode == "wrong-id" else (mode, control_id)
                ack = "\r".join(
                    [
                        f"MSH|^~\\&|RIS|HOSP|PACSLENS||20240101120531||ACK^R01|A{control_id}|P|{message.version}",
                        f"MSA|{code}|{acked}|free text that may name the patient Doe",
                        *(["ERR|||207^Application internal error^HL70357|E"] if code not in ("AA", "CA") else []),
                    ]
                )
                self.request.sendall(b"\x0b" + ack.encode() + b"\x1c\r")

        self.port = port or free_port()
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mllp() -> Iterator[MLLPListener]:
    server = MLLPListener()
    yield server
    server.stop()


def mllp_frame_read(sock: socket.socket) -> bytes | None:
    """One MLLP frame (<VT> message <FS><CR>) from `sock`, or None when the peer hangs up first."""
    buffer = b""
    while b"\x1c\r" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    return buffer[: buffer.index(b"\x1c\r") + 2]
