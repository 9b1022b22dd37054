"""A FHIR R4 stub for fault injection: resources in memory, bodies validated with fhir.resources,
conditional create (If-None-Exist) and conditional update, bearer `TOKEN` required, and on
demand scripted statuses (`script`), silence (`hang`) or a replaced handler (slow answers).
The normal path is tested against a real FHIR server (tests/support/fhir_router.py), which
cannot be made to answer 503 or to hang.

The `fhir_server` fixture (registered in conftest) is one on a free port, stopped at teardown.
`send` delivers a result (by default tests.support.identities.result_payload) to a server as
the FHIR sender does.
"""

from __future__ import annotations

import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation

from results.deliver.fhir import send_fhir_result
from results.deliver.payload import ResultPayload
from tests.support.identities import result_payload
from tests.support.net import free_port

TOKEN = "test-token"
MODELS = {"Observation": Observation, "ImagingStudy": ImagingStudy}


class FHIRServer:
    """Resources in memory; `script` is a list of statuses to answer the next requests with
    instead of doing the work (an OperationOutcome body); `hang` makes it not answer."""

    def __init__(self) -> None:
        self.resources: dict[str, list[dict[str, Any]]] = {"Observation": [], "ImagingStudy": []}
        self.script: list[int] = []
        self.requests: list[tuple[str, str]] = []
        self.hang = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.handle(self, "GET")

            def do_POST(self) -> None:
                server.handle(self, "POST")

            def do_PUT(self) -> None:
                server.handle(self, "PUT")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def count(self, resource_type: str, system: str, value: str) -> int:
        return len(self.matching(resource_type, f"{system}|{value}"))

    def matching(self, resource_type: str, token: str) -> list[dict[str, Any]]:
        system, _, value = token.partition("|")
        return [
            r
            for r in self.resources[resource_type]
            if any(i.get("system") == system and i.get("value") == value for i in r.get("identifier", []))
        ]

    def seed(self, resource: dict[str, Any]) -> dict[str, Any]:
        kind = resource["resourceType"]
        stored = {**resource, "id": f"{kind[:3].lower()}{len(self.resources[kind]) + 1}", "meta": {"versionId": "1"}}
        self.resources[kind].append(stored)
        return stored

    def handle(self, request: http.server.BaseHTTPRequestHandler, method: str) -> None:
        url = urllib.parse.urlsplit(request.path)
        resource_type = url.path.rsplit("/", 1)[-1]
        query = dict(urllib.parse.parse_qsl(url.query))
        self.requests.append((method, resource_type))
        if self.hang.is_set():
            self.release.wait(30)
            return
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.reply(request, 401, outcome("login"))
        if self.script:
            status = self.script.pop(0)
            return self.reply(request, status, outcome("transient" if status >= 500 else "processing"))
        body = None
        if method in ("POST", "PUT"):
            assert request.headers["Content-Type"] == "application/fhir+json"
            body = json.loads(request.rfile.read(int(request.headers["Content-Length"])))
            try:
                MODELS[resource_type].model_validate(body)
            except Exception:
                return self.reply(request, 422, outcome("invalid"))
        with self.lock:
            if method == "GET":
                found = self.matching(resource_type, query["identifier"])
                return self.reply(
                    request,
                    200,
                    {
                        "resourceType": "Bundle",
                        "type": "searchset",
                        "total": len(found),
                        "entry": [{"resource": r} for r in found],
                    },
                )
            if method == "POST":
                condition = dict(urllib.parse.parse_qsl(request.headers["If-None-Exist"]))
                found = self.matching(resource_type, condition["identifier"])
                if len(found) > 1:
                    return self.reply(request, 412, outcome("duplicate"))
                if found:
                    return self.reply(request, 200, found[0])
                stored = self.seed(body)
                return self.reply(
                    request, 201, stored, {"Location": f"{self.url}/{resource_type}/{stored['id']}/_history/1"}
                )
            found = self.matching(resource_type, query["identifier"])  # PUT: conditional update
            if len(found) > 1:
                return self.reply(request, 412, outcome("multiple-matches"))
            if not found:
                return self.reply(request, 201, self.seed(body))
            version = str(int(found[0]["meta"]["versionId"]) + 1)
            found[0].clear()
            found[0].update({**body, "id": body.get("id") or "ima1", "meta": {"versionId": version}})
            return self.reply(request, 200, found[0])

    @staticmethod
    def reply(
        request: http.server.BaseHTTPRequestHandler,
        status: int,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        raw = json.dumps(body).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/fhir+json")
        request.send_header("Content-Length", str(len(raw)))
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(raw)


def outcome(code: str) -> dict[str, Any]:
    # Diagnostics echo the patient, as some servers do: the client must not repeat them.
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": "Patient Doe^Jane"}],
    }


@pytest.fixture
def fhir_server() -> Iterator[FHIRServer]:
    server = FHIRServer()
    yield server
    server.stop()


def send(server: FHIRServer, payload: ResultPayload | None = None, **kwargs: Any):
    return send_fhir_result(server.url, payload or result_payload(), bearer_token=kwargs.pop("token", TOKEN), **kwargs)
