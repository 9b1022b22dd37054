"""FHIR R4 result delivery against a local FHIR server that validates bodies with
fhir.resources and implements conditional create and conditional update."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

from tests.identities import identity
import pytest
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation

from results.deliver.fhir import (
    FHIRSettings,
    build_imaging_study,
    build_observation,
    observation_identifier,
    send_fhir_result,
)
from results.deliver.payload import OutcomeKind, Priority, Protocol, ResultPayload
from tests.conftest import free_port

TOKEN = "test-token"
MODELS = {"Observation": Observation, "ImagingStudy": ImagingStudy}


def make_payload(**overrides: Any) -> ResultPayload:
    values: dict[str, Any] = dict(
        study_instance_uid="1.2.826.0.1.3680043.8.498.77", accession_number="ACC0077",
        patient_id="PID-77", patient_name="Doe^Jane", triage_score=0.8731, finding_flag=True,
        model_name="demo-ich", model_version="1.2.0", identity=identity("result-77"),
        created_at=dt.datetime(2024, 1, 1, 12, 5, 30, tzinfo=dt.UTC), priority=Priority.STAT,
    )
    values.update(overrides)
    return ResultPayload(**values)


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
            def do_GET(self) -> None:  # noqa: N802
                server.handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                server.handle(self, "POST")

            def do_PUT(self) -> None:  # noqa: N802
                server.handle(self, "PUT")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def count(self, resource_type: str, system: str, value: str) -> int:
        return len(self.matching(resource_type, f"{system}|{value}"))

    def matching(self, resource_type: str, token: str) -> list[dict[str, Any]]:
        system, _, value = token.partition("|")
        return [r for r in self.resources[resource_type]
                if any(i.get("system") == system and i.get("value") == value
                       for i in r.get("identifier", []))]

    def seed(self, resource: dict[str, Any]) -> dict[str, Any]:
        kind = resource["resourceType"]
        stored = {**resource, "id": f"{kind[:3].lower()}{len(self.resources[kind]) + 1}",
                  "meta": {"versionId": "1"}}
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
                return self.reply(request, 200, {"resourceType": "Bundle", "type": "searchset",
                                                 "total": len(found),
                                                 "entry": [{"resource": r} for r in found]})
            if method == "POST":
                condition = dict(urllib.parse.parse_qsl(request.headers["If-None-Exist"]))
                found = self.matching(resource_type, condition["identifier"])
                if len(found) > 1:
                    return self.reply(request, 412, outcome("duplicate"))
                if found:
                    return self.reply(request, 200, found[0])
                stored = self.seed(body)
                return self.reply(request, 201, stored,
                                  {"Location": f"{self.url}/{resource_type}/{stored['id']}/_history/1"})
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
    def reply(request: http.server.BaseHTTPRequestHandler, status: int, body: dict[str, Any],
              headers: dict[str, str] | None = None) -> None:
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
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": "Patient Doe^Jane"}]}


@pytest.fixture
def fhir_server() -> Iterator[FHIRServer]:
    server = FHIRServer()
    yield server
    server.release.set()
    server.httpd.shutdown()
    server.httpd.server_close()


def send(server: FHIRServer, payload: ResultPayload | None = None, **kwargs: Any):
    return send_fhir_result(server.url, payload or make_payload(),
                            bearer_token=kwargs.pop("token", TOKEN), **kwargs)


# --- Building -----------------------------------------------------------------------------------

def test_the_observation_maps_score_flag_study_and_model():
    payload = make_payload()
    body = build_observation(payload)
    Observation.model_validate(body)
    assert body["identifier"] == [{"system": "urn:ietf:rfc:3986",
                                   "value": payload.identity.urn("fhir-observation")}]
    assert body["status"] == "preliminary"
    assert body["valueQuantity"] == {"value": 0.8731, "unit": "score",
                                     "system": "http://unitsofmeasure.org", "code": "{score}"}
    assert body["component"][0]["valueBoolean"] is True
    assert body["component"][0]["code"]["coding"][0]["code"] == "PL0002"
    assert body["derivedFrom"] == [{"type": "ImagingStudy", "identifier": {
        "system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.8.498.77"}}]
    assert "demo-ich 1.2.0" in body["device"]["display"]
    assert body["subject"]["identifier"]["value"] == "PID-77"
    assert "Doe" not in json.dumps(body), "the name is not needed and not sent"


def test_a_final_result_is_final():
    assert build_observation(make_payload(is_final=True))["status"] == "final"


def test_the_identifier_is_stable_per_result():
    assert observation_identifier(make_payload()) == observation_identifier(make_payload())
    assert (observation_identifier(make_payload())
            != observation_identifier(make_payload(identity=identity("result-78"))))


def test_the_imaging_study_merges_into_the_ris_copy():
    payload = make_payload()
    existing = {"resourceType": "ImagingStudy", "id": "ris-1", "meta": {"versionId": "3"},
                "status": "available", "subject": {"reference": "Patient/p1"},
                "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:" + payload.study_instance_uid}],
                "numberOfSeries": 1, "series": [{"uid": "1.2.3.4", "modality": {
                    "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}}]}
    body = build_imaging_study(payload, observation_id="obs9", existing=existing)
    ImagingStudy.model_validate(body)
    assert body["series"] == existing["series"] and body["subject"] == existing["subject"]
    assert "meta" not in body
    assert len([i for i in body["identifier"] if i.get("system") == "urn:dicom:uid"]) == 1
    assert any(i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN"
               and i["value"] == "ACC0077" for i in body["identifier"])
    (extension,) = body["extension"]
    assert extension["valueReference"]["reference"] == "Observation/obs9"
    again = build_imaging_study(payload, observation_id="obs9", existing=body)
    assert again["extension"] == body["extension"] and again["identifier"] == body["identifier"]


def test_an_invalid_resource_fails_before_sending_without_patient_data(fhir_server):
    bad_code = FHIRSettings(flag_code=" PL0002")  # FHIR codes cannot start with a space
    outcome = send(fhir_server, make_payload(patient_id="SECRET-ID"), settings=bad_code)
    assert (outcome.kind, outcome.code) == (OutcomeKind.PERMANENT, None)
    assert "component.0.code.coding.0.code" in outcome.message
    assert "SECRET" not in outcome.describe()
    assert fhir_server.requests == []


def test_a_missing_patient_id_is_permanent(fhir_server):
    outcome = send(fhir_server, make_payload(patient_id=""))
    assert outcome.kind is OutcomeKind.PERMANENT
    assert fhir_server.requests == []


# --- Against the server ----------------------------------------------------------------------

def test_it_creates_the_observation_and_the_imaging_study(fhir_server):
    payload = make_payload()
    outcome = send(fhir_server, payload)

    assert outcome.kind is OutcomeKind.SUCCESS, outcome.describe()
    assert (outcome.protocol, outcome.key) == (Protocol.FHIR, observation_identifier(payload)[1])
    assert fhir_server.count("Observation", *observation_identifier(payload)) == 1
    (study,) = fhir_server.resources["ImagingStudy"]
    (observation,) = fhir_server.resources["Observation"]
    assert study["extension"][0]["valueReference"]["reference"] == f"Observation/{observation['id']}"


def test_a_re_send_never_duplicates(fhir_server):
    payload = make_payload()
    assert send(fhir_server, payload).ok
    again = send(fhir_server, payload)
    assert again.ok, again.describe()
    assert fhir_server.count("Observation", *observation_identifier(payload)) == 1
    assert len(fhir_server.resources["Observation"]) == 1
    assert len(fhir_server.resources["ImagingStudy"]) == 1
    assert len(fhir_server.resources["ImagingStudy"][0]["extension"]) == 1


def test_it_updates_the_imaging_study_the_ris_already_has(fhir_server):
    payload = make_payload()
    fhir_server.seed({"resourceType": "ImagingStudy", "status": "available",
                      "subject": {"reference": "Patient/p1"}, "numberOfInstances": 42,
                      "identifier": [{"system": "urn:dicom:uid",
                                      "value": f"urn:oid:{payload.study_instance_uid}"}]})
    assert send(fhir_server, payload).ok
    (study,) = fhir_server.resources["ImagingStudy"]
    assert study["numberOfInstances"] == 42 and study["meta"]["versionId"] == "2"
    assert study["extension"][0]["url"].endswith("ai-triage-result")


def test_down_then_up_is_delivered_exactly_once(fhir_server):
    payload = make_payload()
    fhir_server.script = [503]
    first = send(fhir_server, payload)
    assert (first.kind, first.code) == (OutcomeKind.TRANSIENT, 503)
    assert send(fhir_server, payload).ok
    assert fhir_server.count("Observation", *observation_identifier(payload)) == 1


def test_duplicate_observations_at_the_server_are_permanent(fhir_server):
    payload = make_payload()
    observation = build_observation(payload)
    fhir_server.seed(observation)
    fhir_server.seed(observation)
    outcome = send(fhir_server, payload)
    assert (outcome.kind, outcome.code) == (OutcomeKind.PERMANENT, 412)


@pytest.mark.parametrize(("status", "kind"), [
    (400, OutcomeKind.PERMANENT), (409, OutcomeKind.PERMANENT), (412, OutcomeKind.PERMANENT),
    (422, OutcomeKind.PERMANENT), (403, OutcomeKind.CONFIG_ERROR), (404, OutcomeKind.CONFIG_ERROR),
    (429, OutcomeKind.TRANSIENT), (500, OutcomeKind.TRANSIENT), (503, OutcomeKind.TRANSIENT),
])
def test_http_statuses_are_classified(fhir_server, status, kind):
    fhir_server.script = [status]
    outcome = send(fhir_server)
    assert (outcome.kind, outcome.code) == (kind, status)
    assert "Doe" not in outcome.describe(), "OperationOutcome diagnostics are not repeated"


def test_a_failing_second_step_is_classified_too(fhir_server):
    fhir_server.script = []
    payload = make_payload()
    # Let the Observation through, then fail the ImagingStudy search with 503.
    original = fhir_server.handle

    def fail_search(request, method):
        if method == "GET":
            fhir_server.script = [503]
        return original(request, method)

    fhir_server.handle = fail_search
    outcome = send(fhir_server, payload)
    assert (outcome.kind, outcome.code) == (OutcomeKind.TRANSIENT, 503)
    assert "ImagingStudy" in outcome.message
    assert fhir_server.count("Observation", *observation_identifier(payload)) == 1


def test_a_wrong_token_is_a_config_error(fhir_server):
    outcome = send(fhir_server, token="wrong")
    assert (outcome.kind, outcome.code) == (OutcomeKind.CONFIG_ERROR, 401)
    assert "wrong" not in outcome.describe()


def test_a_timeout_is_transient(fhir_server):
    fhir_server.hang.set()
    outcome = send(fhir_server, timeout=1)
    assert (outcome.kind, outcome.code) == (OutcomeKind.TRANSIENT, None)


def test_a_server_that_is_down_is_transient():
    outcome = send_fhir_result(f"http://127.0.0.1:{free_port()}/fhir", make_payload(),
                               bearer_token=TOKEN, timeout=2)
    assert outcome.kind is OutcomeKind.TRANSIENT


def test_the_documented_examples_are_what_the_code_builds():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "fhir-mapping.md").read_text()
    blocks = [block.split("```", 1)[0] for block in doc.split("```json\n")[1:]]
    documented_observation, documented_study = (json.loads(block) for block in blocks)
    assert documented_observation == build_observation(make_payload())
    assert documented_study == build_imaging_study(make_payload(), observation_id="123")
