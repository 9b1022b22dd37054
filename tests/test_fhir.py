"""FHIR R4 result delivery: the normal path against a real FHIR server (Medplum's FHIR router,
tests/support/fhir_router.py), faults (scripted statuses, silence) against the stub of
tests/support/fhir_server.py."""

from __future__ import annotations

import json
import urllib.error

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
from results.deliver.payload import OutcomeKind, Protocol
from tests.support import fhir_router as router
from tests.support.fhir_server import TOKEN, send
from tests.support.identities import identity
from tests.support.identities import result_payload as make_payload
from tests.support.net import free_port

# --- Building -----------------------------------------------------------------------------------


def test_the_observation_maps_score_flag_study_and_model():
    payload = make_payload()
    body = build_observation(payload)
    Observation.model_validate(body)
    assert body["identifier"] == [{"system": "urn:ietf:rfc:3986", "value": payload.identity.urn("fhir-observation")}]
    assert body["status"] == "preliminary"
    assert body["valueQuantity"] == {
        "value": 0.8731,
        "unit": "score",
        "system": "http://unitsofmeasure.org",
        "code": "{score}",
    }
    assert body["component"][0]["valueBoolean"] is True
    assert body["component"][0]["code"]["coding"][0]["code"] == "PL0002"
    assert body["derivedFrom"] == [
        {
            "type": "ImagingStudy",
            "identifier": {"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.8.498.77"},
        }
    ]
    assert "demo-ich 1.2.0" in body["device"]["display"]
    assert body["subject"]["identifier"]["value"] == "PID-77"
    assert "Doe" not in json.dumps(body), "the name is not needed and not sent"


def test_a_final_result_is_final():
    assert build_observation(make_payload(is_final=True))["status"] == "final"


def test_the_identifier_is_stable_per_result():
    assert observation_identifier(make_payload()) == observation_identifier(make_payload())
    assert observation_identifier(make_payload()) != observation_identifier(
        make_payload(identity=identity("result-78"))
    )


def test_the_imaging_study_merges_into_the_ris_copy():
    payload = make_payload()
    existing = {
        "resourceType": "ImagingStudy",
        "id": "ris-1",
        "meta": {"versionId": "3"},
        "status": "available",
        "subject": {"reference": "Patient/p1"},
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:" + payload.study_instance_uid}],
        "numberOfSeries": 1,
        "series": [
            {"uid": "1.2.3.4", "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}}
        ],
    }
    body = build_imaging_study(payload, observation_id="obs9", existing=existing)
    ImagingStudy.model_validate(body)
    assert body["series"] == existing["series"] and body["subject"] == existing["subject"]
    assert "meta" not in body
    assert len([i for i in body["identifier"] if i.get("system") == "urn:dicom:uid"]) == 1
    assert any(
        i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN" and i["value"] == "ACC0077"
        for i in body["identifier"]
    )
    (extension,) = body["extension"]
    assert extension["valueReference"]["reference"] == "Observation/obs9"
    again = build_imaging_study(payload, observation_id="obs9", existing=body)
    assert again["extension"] == body["extension"] and again["identifier"] == body["identifier"]


# --- Against a real FHIR server ----------------------------------------------------------------


def send_to(peer: router.FHIRRouterPeer, payload=None, **kwargs):
    return send_fhir_result(
        peer.url, payload or make_payload(), bearer_token=kwargs.pop("token", router.TOKEN), **kwargs
    )


def test_an_invalid_resource_fails_before_sending_without_patient_data(fhir_router):
    bad_code = FHIRSettings(flag_code=" PL0002")  # FHIR codes cannot start with a space
    outcome = send_to(fhir_router, make_payload(patient_id="SECRET-ID"), settings=bad_code)
    assert (outcome.kind, outcome.code) == (OutcomeKind.PERMANENT, None)
    assert "component.0.code.coding.0.code" in outcome.message
    assert "SECRET" not in outcome.describe()
    assert fhir_router.search("Observation") == [] and fhir_router.search("ImagingStudy") == []


def test_a_missing_patient_id_is_permanent(fhir_router):
    outcome = send_to(fhir_router, make_payload(patient_id=""))
    assert outcome.kind is OutcomeKind.PERMANENT
    assert fhir_router.search("Observation") == []


def test_it_creates_the_observation_and_the_imaging_study(fhir_router):
    payload = make_payload()
    outcome = send_to(fhir_router, payload)

    assert outcome.kind is OutcomeKind.SUCCESS, outcome.describe()
    assert (outcome.protocol, outcome.key) == (Protocol.FHIR, observation_identifier(payload)[1])
    (observation,) = fhir_router.search("Observation", identifier="|".join(observation_identifier(payload)))
    (study,) = fhir_router.search("ImagingStudy")
    assert study["extension"][0]["valueReference"]["reference"] == f"Observation/{observation['id']}"
    Observation.model_validate(observation)
    ImagingStudy.model_validate(study)


def test_a_re_send_never_duplicates(fhir_router):
    payload = make_payload()
    assert send_to(fhir_router, payload).ok
    again = send_to(fhir_router, payload)
    assert again.ok, again.describe()
    assert fhir_router.count("Observation", *observation_identifier(payload)) == 1
    assert len(fhir_router.search("Observation")) == 1
    (study,) = fhir_router.search("ImagingStudy")
    assert len(study["extension"]) == 1


def test_it_updates_the_imaging_study_the_ris_already_has(fhir_router):
    payload = make_payload()
    seeded = fhir_router.create(
        {
            "resourceType": "ImagingStudy",
            "status": "available",
            "subject": {"reference": "Patient/p1"},
            "numberOfInstances": 42,
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{payload.study_instance_uid}"}],
        }
    )
    assert send_to(fhir_router, payload).ok
    (study,) = fhir_router.search("ImagingStudy")
    assert study["id"] == seeded["id"] and study["numberOfInstances"] == 42
    assert study["meta"]["versionId"] != seeded["meta"]["versionId"], "updated in place, a new version"
    assert study["extension"][0]["url"].endswith("ai-triage-result")


def test_the_server_finds_the_study_by_its_identifier_not_by_luck(fhir_router):
    """Another study at the RIS stays untouched: the conditional update's search is the server's."""
    other = fhir_router.create(
        {
            "resourceType": "ImagingStudy",
            "status": "available",
            "subject": {"reference": "Patient/p2"},
            "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.999"}],
        }
    )
    assert send_to(fhir_router, make_payload()).ok
    studies = {s["id"]: s for s in fhir_router.search("ImagingStudy")}
    assert len(studies) == 2 and "extension" not in studies[other["id"]]


def test_the_server_refuses_an_invalid_resource(fhir_router):
    """Our own validation is not the only line: a real server's validator refuses bad bodies too."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        fhir_router.create({"resourceType": "Observation", "code": {"text": "no status"}})
    assert refused.value.code == 400


def test_duplicate_observations_at_the_real_server_are_permanent(fhir_router):
    payload = make_payload()
    observation = build_observation(payload)
    fhir_router.create(observation)
    fhir_router.create(observation)
    outcome = send_to(fhir_router, payload)
    assert (outcome.kind, outcome.code) == (OutcomeKind.PERMANENT, 412)


def test_a_wrong_token_at_the_real_server_is_a_config_error(fhir_router):
    outcome = send_to(fhir_router, token="wrong")
    assert (outcome.kind, outcome.code) == (OutcomeKind.CONFIG_ERROR, 401)
    assert "wrong" not in outcome.describe()


# --- Faults, injected by the stub -------------------------------------------------------------


def test_down_then_up_is_delivered_exactly_once(fhir_server):
    payload = make_payload()
    fhir_server.script = [503]
    first = send(fhir_server, payload)
    assert (first.kind, first.code) == (OutcomeKind.TRANSIENT, 503)
    assert send(fhir_server, payload).ok
    assert fhir_server.count("Observation", *observation_identifier(payload)) == 1


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, OutcomeKind.PERMANENT),
        (409, OutcomeKind.PERMANENT),
        (412, OutcomeKind.PERMANENT),
        (422, OutcomeKind.PERMANENT),
        (403, OutcomeKind.CONFIG_ERROR),
        (404, OutcomeKind.CONFIG_ERROR),
        (429, OutcomeKind.TRANSIENT),
        (500, OutcomeKind.TRANSIENT),
        (503, OutcomeKind.TRANSIENT),
    ],
)
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


def test_a_timeout_is_transient(fhir_server):
    fhir_server.hang.set()
    outcome = send(fhir_server, timeout=1)
    assert (outcome.kind, outcome.code) == (OutcomeKind.TRANSIENT, None)


def test_a_server_that_is_down_is_transient():
    outcome = send_fhir_result(f"http://127.0.0.1:{free_port()}/fhir", make_payload(), bearer_token=TOKEN, timeout=2)
    assert outcome.kind is OutcomeKind.TRANSIENT


def test_the_documented_examples_are_what_the_code_builds():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "fhir-mapping.md").read_text()
    blocks = [block.split("```", 1)[0] for block in doc.split("```json\n")[1:]]
    # The first two: the defaults; the profile's examples are checked in test_coding_profiles.
    documented_observation, documented_study = (json.loads(block) for block in blocks[:2])
    assert documented_observation == build_observation(make_payload())
    assert documented_study == build_imaging_study(make_payload(), observation_id="123")
