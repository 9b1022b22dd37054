"""Identifiers we mint are unique across installations and stable across re-sends."""

from __future__ import annotations

import json
import logging
import re
import uuid

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import PYDICOM_ROOT_UID, UID, generate_uid

from results.deliver.contents import result_payload
from results.deliver.fhir import build_imaging_study, dumps
from results.deliver.identity import hl7_control_id, identity_file_read, installation_current
from results.deliver.ledger import deliveries_create
from results.deliver.payload import ResultIdentity
from results.models import Installation
from tests.support.factories import dicom_destination, hl7_destination, inferred_study
from tests.support.fhir_router import TOKEN as ROUTER_TOKEN
from tests.support.identities import identity
from tests.support.identities import result_payload as make_payload

PURPOSES = ("sr-sop-instance", "sr-series", "sr-tracking", "fhir-observation")


class TestInstallation:
    pytestmark = pytest.mark.django_db

    def test_the_migration_made_one_and_the_data_dir_mirrors_it(self, data_dir):
        installation = installation_current()
        assert Installation.objects.get() == installation
        assert identity_file_read(data_dir / "installation.json") == installation.uuid
        assert installation_current().uuid == installation.uuid

    def test_the_database_wins_over_a_data_dir_of_another_installation(self, data_dir, caplog):
        other = uuid.uuid4()
        (data_dir / "installation.json").write_text(json.dumps({"installation": str(other)}))
        with caplog.at_level(logging.WARNING, logger="results.deliver.identity"):
            installation = installation_current()
        assert installation.uuid != other
        assert identity_file_read(data_dir / "installation.json") == installation.uuid
        assert str(other) in caplog.text and str(installation.uuid) in caplog.text

    def test_a_fresh_database_is_a_new_installation(self, data_dir):
        before = installation_current().uuid
        Installation.objects.all().delete()  # as a reset database has no row
        after = installation_current().uuid
        assert after != before
        assert identity_file_read(data_dir / "installation.json") == after

    def test_setup_site_names_it(self, data_dir, capsys):
        (data_dir / "installation.json").write_text("{not json")
        call_command("setup_site")
        installation = Installation.objects.get()
        assert f"installation {installation.uuid}" in capsys.readouterr().out
        assert identity_file_read(data_dir / "installation.json") == installation.uuid

    def test_study_status_names_it(self, data_dir, rule, mllp, capsys):
        study, _ = inferred_study(data_dir)
        call_command("study_status", study.study_instance_uid, "--json")
        assert json.loads(capsys.readouterr().out)["installation"] == str(installation_current().uuid)


class TestKeys:
    pytestmark = pytest.mark.django_db

    def test_each_result_has_its_own_random_uuid(self, data_dir):
        _, first = inferred_study(data_dir)
        _, second = inferred_study(data_dir)
        assert first.uid != second.uid and first.uid.version == 4

    def test_hl7_control_ids_are_new_per_delivery_and_name_the_installation(self, data_dir):
        installation = installation_current()
        ids = {hl7_control_id(installation) for _ in range(2000)}
        assert len(ids) == 2000
        assert all(re.fullmatch(f"{installation.tag}[A-Z2-7]{{15}}", i) for i in ids)

    def test_a_site_org_root_is_used_for_new_results(self, data_dir, settings, rule, mllp):
        settings.DICOM_UID_ROOT = "1.2.826.0.1.3680043.10.999"
        study, result = inferred_study(data_dir)
        dicom_destination(rule, 104)
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        assert result.uid_root == "1.2.826.0.1.3680043.10.999"
        assert delivery.idempotency_key.startswith("1.2.826.0.1.3680043.10.999.")
        assert UID(delivery.idempotency_key).is_valid
        settings.DICOM_UID_ROOT = ""  # a later change of the setting does not change this result's UIDs
        assert result_payload(result=result).sr_sop_instance_uid == delivery.idempotency_key

    def test_a_site_fhir_system_takes_the_bare_uuid(self, data_dir, settings, rule):
        from results.models import Destination

        settings.FHIR_IDENTIFIER_SYSTEM = "https://hospital.example/pacslens/result"
        study, result = inferred_study(data_dir)
        destination = Destination.objects.create(name="fhir", kind="fhir", base_url="http://127.0.0.1:9/fhir")
        destination.rules.add(rule)
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
        assert delivery.identifier_system == "https://hospital.example/pacslens/result"
        assert str(uuid.UUID(delivery.idempotency_key)) == delivery.idempotency_key

    def test_two_hl7_destinations_get_two_control_ids(self, data_dir, rule, mllp):
        study, result = inferred_study(data_dir)
        hl7_destination(rule, mllp.port)
        hl7_destination(rule, mllp.port, name="ris-2")
        keys = {d.idempotency_key for d in deliveries_create(study=study, results=[result], rule_ids=[rule.pk])}
        assert len(keys) == 2


class TestResultIdentity:
    def test_uuid_uids_are_valid_and_stable(self):
        one = identity("result-1")
        for purpose in PURPOSES:
            uid = one.uid(purpose)
            assert uid.startswith("2.25.") and uid.is_valid and len(uid) <= 64
            assert uid == identity("result-1").uid(purpose)
        assert len({one.uid(p) for p in PURPOSES}) == len(PURPOSES)

    def test_legacy_results_keep_the_identifiers_they_were_delivered_with(self):
        legacy = ResultIdentity(installation=uuid.uuid4(), result=uuid.uuid4(), legacy_seed="pacslens-result-42")
        # The derivation of PacsLens before identities: pydicom's root, seed and purpose.
        old = generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["pacslens-result-42\x00sr-sop-instance"])
        assert legacy.uid("sr-sop-instance") == old
        old_fhir = generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["pacslens-result-42\x00fhir-observation"])
        assert legacy.urn("fhir-observation") == f"urn:oid:{old_fhir}"
        old_device = generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["model\x00demo\x001"])
        assert legacy.device_uid("demo", "1") == old_device

    def test_the_device_uid_is_per_installation_and_model_version(self):
        a, b = identity("r1"), identity("r2")
        assert a.device_uid("demo", "1") == b.device_uid("demo", "1")
        assert a.device_uid("demo", "1") != a.device_uid("demo", "2")
        other = identity("r1", installation=uuid.uuid4())
        assert other.device_uid("demo", "1") != a.device_uid("demo", "1")

    @settings(max_examples=300, deadline=None)
    @given(
        installations=st.tuples(st.uuids(), st.uuids()).filter(lambda pair: pair[0] != pair[1]),
        results=st.tuples(st.uuids(), st.uuids()),
        root=st.sampled_from(["", "1.2.826.0.1.3680043.10.999", "1.3.6.1.4.1.99999.7"]),
        purpose=st.sampled_from(PURPOSES),
    )
    def test_keys_from_different_installations_never_collide(self, installations, results, root, purpose):
        one = ResultIdentity(installation=installations[0], result=results[0], uid_root=root)
        two = ResultIdentity(installation=installations[1], result=results[1], uid_root=root)
        assert one.uid(purpose) != two.uid(purpose)
        assert one.urn(purpose) != two.urn(purpose)
        assert one.uid(purpose).is_valid and two.uid(purpose).is_valid

    @settings(max_examples=300, deadline=None)
    @given(installation=st.uuids(), results=st.tuples(st.uuids(), st.uuids()).filter(lambda p: p[0] != p[1]))
    def test_keys_of_different_results_never_collide(self, installation, results):
        one = ResultIdentity(installation=installation, result=results[0])
        two = ResultIdentity(installation=installation, result=results[1])
        assert {one.uid(p) for p in PURPOSES}.isdisjoint({two.uid(p) for p in PURPOSES})


class TestImagingStudyMerge:
    RIS_COPY = """{
      "resourceType": "ImagingStudy", "id": "ris-1",
      "meta": {"versionId": "7", "lastUpdated": "2024-01-01T12:00:00.120+01:00",
               "tag": [{"system": "http://ris.example/tags", "code": "teaching"}]},
      "status": "available", "started": "2024-01-01T11:58:00.120+01:00",
      "identifier": [
        {"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.8.498.77"},
        {"system": "http://ris.example/accession", "type": {"coding": [{"system":
          "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}, "value": "ACC0077"}
      ],
      "subject": {"reference": "Patient/p1"},
      "series": [{"uid": "1.2.3.4", "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "CT"}, "numberOfInstances": 300,
        "extension": [{"url": "http://ris.example/slice", "valueDecimal": 1.50}]}]
    }"""

    def test_it_leaves_what_the_ris_sent_as_sent(self):
        import simplejson

        existing = simplejson.loads(self.RIS_COPY, use_decimal=True)
        merged = build_imaging_study(make_payload(), observation_id="o1", existing=existing)
        text = dumps(merged)
        assert '"valueDecimal": 1.50' in text
        assert '"started": "2024-01-01T11:58:00.120+01:00"' in text
        assert merged["meta"] == {"tag": [{"system": "http://ris.example/tags", "code": "teaching"}]}
        # The RIS's accession identifier under its own system is the one: no second one added.
        assert [i.get("system") for i in merged["identifier"]] == ["urn:dicom:uid", "http://ris.example/accession"]
        assert merged["series"] == existing["series"] and merged["subject"] == existing["subject"]
        assert merged["extension"][0]["valueReference"]["reference"] == "Observation/o1"


@pytest.mark.django_db(transaction=True)
def test_the_migration_gives_results_uuids_and_keeps_delivered_keys(data_dir):
    """Rows made before 0004: a delivered result keeps its legacy identifiers, the others get new ones."""
    executor = MigrationExecutor(connection)
    executor.migrate([("results", "0003_evaluated_instances")])
    old = executor.loader.project_state([("results", "0003_evaluated_instances")]).apps
    study = old.get_model("routing", "Study").objects.create(study_instance_uid="1.2.3.99")
    model = old.get_model("results", "AIModel").objects.create(
        name="demo", version="1", file="x.onnx", sha256="0" * 64, manifest={"output": {"threshold": 0.5}}
    )
    Result = old.get_model("results", "InferenceResult")
    delivered, undelivered = (
        Result.objects.create(
            study=study,
            model=model,
            model_name="demo",
            model_version="1",
            model_sha256="0" * 64,
            status="succeeded",
            score=0.9,
            flagged=True,
        )
        for _ in range(2)
    )
    destination = old.get_model("results", "Destination").objects.create(name="fhir", kind="fhir", base_url="http://x/")
    seed = f"pacslens-result-{delivered.pk}\x00fhir-observation"
    old_key = "urn:oid:" + generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=[seed])
    delivery = old.get_model("results", "Delivery").objects.create(
        result=delivered, destination=destination, study=study, kind="fhir", idempotency_key=old_key
    )

    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
    from results.models import Delivery, InferenceResult

    delivered_now, undelivered_now = (
        InferenceResult.objects.get(pk=delivered.pk),
        InferenceResult.objects.get(pk=undelivered.pk),
    )
    assert delivered_now.uid != undelivered_now.uid
    assert delivered_now.legacy_uid_seed == f"pacslens-result-{delivered.pk}" and undelivered_now.legacy_uid_seed == ""
    assert Installation.objects.count() == 1
    from results.deliver.identity import result_identity

    assert result_identity(delivered_now).urn("fhir-observation") == old_key
    assert result_identity(undelivered_now).urn("fhir-observation").startswith("urn:uuid:")
    assert Delivery.objects.get(pk=delivery.pk).identifier_system == "urn:ietf:rfc:3986"


def test_an_observation_of_another_study_under_our_identifier_is_never_linked(fhir_router):
    """What the old keys did at a real FHIR server: 200 with another patient's Observation."""
    from results.deliver.fhir import build_observation, send_fhir_result
    from results.deliver.payload import OutcomeKind

    def send(payload):
        return send_fhir_result(fhir_router.url, payload, bearer_token=ROUTER_TOKEN)

    earlier = build_observation(make_payload(study_instance_uid="1.2.826.0.1.3680043.8.498.1"))
    fhir_router.create(earlier)
    outcome = send(make_payload())  # same result identity, another study
    assert outcome.kind is OutcomeKind.PERMANENT and "another study" in outcome.message
    assert fhir_router.search("ImagingStudy") == []
    assert send(make_payload(study_instance_uid="1.2.826.0.1.3680043.8.498.1")).ok
