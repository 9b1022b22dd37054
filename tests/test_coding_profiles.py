"""Per-destination coding profiles: a destination with a profile emits exactly its values, read
back by the receiver's kind of parser (hl7apy from a real MLLP listener, fhir.resources from a
real FHIR server, highdicom from Orthanc); without a profile, what PacsLens always sent; and a
delivery keeps the profile it was created with, so a re-send is the same message."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
import yaml
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message, parse_segment

from pacslens.site_config.document import ConfigError, config_export, config_import
from results.deliver.coding import HL7_LINK_FIELDS, coding_profile_problems, fhir_settings, hl7_settings, sr_codes
from results.deliver.fhir import FHIRSettings, build_imaging_study, build_observation
from results.deliver.hl7 import HL7Settings, build_hl7_message
from results.deliver.ledger import deliveries_create, deliveries_run_pending, delivery_retry
from results.deliver.payload import fhir_observation_identifier
from results.deliver.sr import SRCodes
from results.models import CodingProfile, Delivery, DeliveryState, Destination
from routing.models import AuditEntry
from tests.support.factories import dicom_destination, hl7_destination, inferred_study
from tests.support.fhir_router import TOKEN as ROUTER_TOKEN
from tests.support.identities import result_payload

pytestmark = pytest.mark.django_db

HL7_PROFILE = {
    "hl7_patient_id_authority": "HOSP",
    "hl7_patient_id_type": "MR",
    "hl7_order_number_fields": "ORC-2, OBR-2, ORC-3, OBR-3, OBR-19",
    "hl7_order_control": "SC",
    "hl7_service_code": "RAD-AI",
    "hl7_service_text": "Radiology AI triage",
    "hl7_service_coding_system": "99HOSP",
    "hl7_coding_system": "99HOSP",
    "hl7_score_code": "AI-SCORE",
    "hl7_score_text": "Triage score",
    "hl7_flag_code": "AI-FLAG",
    "hl7_flag_text": "Triage finding",
    "hl7_result_status": "F",
    "hl7_study_uid": "zds",
}
FHIR_PROFILE = {
    "fhir_patient_identifier_system": "https://hospital.example/mrn",
    "fhir_accession_identifier_system": "https://hospital.example/accession",
    "fhir_study_identifier_system": "https://hospital.example/study-uid",
    "fhir_observation_identifier_system": "https://hospital.example/ai-result",
    "fhir_code_system": "https://hospital.example/CodeSystem/ai",
    "fhir_score_code": "triage-score",
    "fhir_score_display": "Triage score",
    "fhir_flag_code": "triage-flag",
    "fhir_flag_display": "Triage finding",
    "fhir_result_extension_url": "https://hospital.example/StructureDefinition/ai-result",
}
SR_PROFILE = {
    "sr_scheme_designator": "99HOSP",
    "sr_scheme_version": "2025",
    "sr_scheme_name": "Hospital AI codes",
    "sr_scheme_organization": "Example Hospital",
    "sr_score_code": "H0001",
    "sr_score_meaning": "Triage score",
    "sr_flag_code": "H0002",
    "sr_flag_meaning": "Triage finding",
}


def with_profile(destination: Destination, values: dict[str, Any]) -> CodingProfile:
    profile = CodingProfile(destination=destination, **values)
    profile.full_clean()
    assert coding_profile_problems(profile, destination) == []
    profile.save()
    return profile


def segments(message, name: str) -> list:
    """Every segment called `name`, wherever find_groups put it."""
    found = []
    for child in message.children:
        if child.classname == "Segment":
            if child.name == name:
                found.append(child)
        else:
            found.extend(segments(child, name))
    return found


def z_segments(er7: str, name: str) -> list:
    """A site-defined segment, parsed on its own: no HL7 structure knows where it goes or what
    its fields hold, so hl7apy leaves it out of a message it finds groups in."""
    return [
        parse_segment(line, version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
        for line in er7.split("\r")
        if line.startswith(name + "|")
    ]


def field(segment, number: int) -> str:
    return getattr(segment, f"{segment.name.lower()}_{number}").to_er7()


# --- Defaults: exactly what was sent before profiles ----------------------------------------


def test_the_model_defaults_are_the_builders_defaults():
    snapshot = CodingProfile().snapshot()
    assert fhir_settings(snapshot) == FHIRSettings() == fhir_settings({})
    assert sr_codes(snapshot) == SRCodes() == sr_codes({})
    destination = Destination(name="ris", kind="hl7", hl7_message_type="ORU^R01")
    assert hl7_settings(destination, snapshot) == hl7_settings(destination, {}) == HL7Settings()


def test_a_destination_without_a_profile_sends_the_defaults(data_dir, rule, mllp):
    study, result = inferred_study(data_dir)
    hl7_destination(rule, mllp.port)
    [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
    assert set(delivery.coding) == set(HL7_LINK_FIELDS), "no profile fields: the defaults"
    deliveries_run_pending()
    (er7,) = mllp.messages
    message = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert field(segments(message, "OBX")[0], 3) == "PL0001^AI triage score^99PACSLENS"
    assert field(segments(message, "OBX")[0], 11) == "P"
    assert not z_segments(mllp.messages[0], "ZDS")


# --- HL7 v2 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("message_type", ["ORU^R01", "ORM^O01"])
def test_an_hl7_destination_emits_its_profile(data_dir, rule, mllp, message_type):
    study, result = inferred_study(data_dir)
    destination = hl7_destination(
        rule,
        mllp.port,
        hl7_message_type=message_type,
        sending_application="PACSLENS",
        sending_facility="RADIOLOGY",
        receiving_application="RIS",
        receiving_facility="HOSP",
    )
    with_profile(destination, HL7_PROFILE)
    deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
    assert deliveries_run_pending() == 1
    (er7,) = mllp.messages
    message = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)

    msh = message.msh
    assert [msh.msh_3.to_er7(), msh.msh_4.to_er7(), msh.msh_5.to_er7(), msh.msh_6.to_er7()] == [
        "PACSLENS",
        "RADIOLOGY",
        "RIS",
        "HOSP",
    ]
    (pid,) = segments(message, "PID")
    assert field(pid, 3) == f"{study.patient_id}^^^HOSP^MR"
    (orc,) = segments(message, "ORC")
    (obr,) = segments(message, "OBR")
    accession = study.accession_number
    assert field(orc, 2) == field(orc, 3) == field(obr, 2) == field(obr, 3) == accession
    assert field(obr, 18) == field(obr, 19) == accession
    assert field(obr, 4) == "RAD-AI^Radiology AI triage^99HOSP"
    (zds,) = z_segments(er7, "ZDS")
    assert field(zds, 1) == f"{study.study_instance_uid}^PACSLENS^Application^DICOM"
    assert er7.split("\r")[-1].startswith("ZDS|"), "last, after the standard segments"
    if message_type == "ORU^R01":
        score, flag = segments(message, "OBX")
        assert field(score, 3) == "AI-SCORE^Triage score^99HOSP"
        assert field(flag, 3) == "AI-FLAG^Triage finding^99HOSP"
        assert field(score, 11) == field(flag, 11) == field(obr, 25) == "F"
    else:
        assert field(orc, 1) == "SC"


@pytest.mark.parametrize(("placement", "value_type"), [("obx-rp", "RP"), ("obx-st", "ST")])
def test_the_study_uid_goes_in_an_obx_where_the_profile_says(data_dir, rule, mllp, placement, value_type):
    study, result = inferred_study(data_dir)
    destination = hl7_destination(rule, mllp.port)
    with_profile(destination, {"hl7_study_uid": placement})
    deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
    deliveries_run_pending()
    message = parse_message(mllp.messages[0], validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    uid_obx = segments(message, "OBX")[-1]
    assert (field(uid_obx, 2), field(uid_obx, 3)) == (value_type, "110180^Study Instance UID^DCM")
    expected = study.study_instance_uid + ("^PACSLENS^Application^DICOM" if value_type == "RP" else "")
    assert field(uid_obx, 5) == expected
    assert not z_segments(mllp.messages[0], "ZDS")


@pytest.mark.parametrize("version", ["2.3", "2.4", "2.5", "2.5.1"])
@pytest.mark.parametrize("message_type", ["ORU^R01", "ORM^O01"])
@pytest.mark.parametrize("placement", ["zds", "obx-rp", "obx-st"])
def test_every_placement_validates_in_every_version(version, message_type, placement):
    settings = HL7Settings(version=version, study_uid=placement, order_number_fields=("ORC-2", "OBR-3"))
    er7 = build_hl7_message(result_payload(), message_type=message_type, control_id="C1", settings=settings)
    assert "1.2.826.0.1.3680043.8.498.77" in er7


# --- FHIR ---------------------------------------------------------------------------------------


def test_a_fhir_destination_emits_its_profile(data_dir, rule, fhir_router):
    study, result = inferred_study(data_dir)
    destination = Destination.objects.create(
        name="fhir", kind="fhir", base_url=fhir_router.url, auth="bearer", secret=ROUTER_TOKEN
    )
    destination.rules.add(rule)
    with_profile(destination, FHIR_PROFILE)
    [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
    assert delivery.identifier_system == "https://hospital.example/ai-result"
    deliveries_run_pending()
    delivery.refresh_from_db()
    assert delivery.state == DeliveryState.DELIVERED, delivery.last_error

    (observation_json,) = fhir_router.search(
        "Observation", identifier=f"https://hospital.example/ai-result|{delivery.idempotency_key}"
    )
    observation = Observation.model_validate(observation_json)
    assert [(c.system, c.code, c.display) for c in observation.code.coding] == [
        ("https://hospital.example/CodeSystem/ai", "triage-score", "Triage score")
    ]
    assert [(c.system, c.code) for c in observation.component[0].code.coding] == [
        ("https://hospital.example/CodeSystem/ai", "triage-flag")
    ]
    assert (observation.subject.identifier.system, observation.subject.identifier.value) == (
        "https://hospital.example/mrn",
        study.patient_id,
    )
    study_id = ("https://hospital.example/study-uid", study.study_instance_uid)
    assert (observation.derivedFrom[0].identifier.system, observation.derivedFrom[0].identifier.value) == study_id

    (imaging_json,) = fhir_router.search("ImagingStudy", identifier="|".join(study_id))
    imaging = ImagingStudy.model_validate(imaging_json)
    identifiers = {(i.system, i.value, i.type.coding[0].code if i.type else None) for i in imaging.identifier}
    assert identifiers == {
        (*study_id, None),
        ("https://hospital.example/accession", study.accession_number, "ACSN"),
    }
    (extension,) = imaging.extension
    assert extension.url == "https://hospital.example/StructureDefinition/ai-result"
    assert extension.valueReference.reference == f"Observation/{observation.id}"
    # The accession is searchable the way the RIS would look for it.
    assert (
        len(
            fhir_router.search(
                "ImagingStudy", identifier=f"https://hospital.example/accession|{study.accession_number}"
            )
        )
        == 1
    )


def test_a_profile_change_leaves_a_pending_fhir_resend_alone(data_dir, rule, fhir_router):
    """The study identifier is the conditional update's search: changed under a pending re-send,
    it would make a second ImagingStudy. The delivery keeps the profile it was created with."""
    study, result = inferred_study(data_dir)
    destination = Destination.objects.create(
        name="fhir", kind="fhir", base_url=fhir_router.url, auth="bearer", secret=ROUTER_TOKEN
    )
    destination.rules.add(rule)
    [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
    deliveries_run_pending()
    with_profile(destination, FHIR_PROFILE)
    delivery_retry(deliveries=Delivery.objects.filter(pk=delivery.pk), actor="test")
    deliveries_run_pending()
    delivery.refresh_from_db()
    assert delivery.state == DeliveryState.DELIVERED, delivery.last_error
    (imaging,) = fhir_router.search("ImagingStudy")
    systems = {i.get("system") for i in imaging["identifier"]}
    assert "urn:dicom:uid" in systems and "https://hospital.example/study-uid" not in systems
    assert len(fhir_router.search("Observation")) == 1
    assert fhir_router.search("Observation")[0]["code"]["coding"][0]["code"] == "PL0001"


# --- Re-sends ------------------------------------------------------------------------------------


def test_a_resend_is_the_same_message_whatever_the_profile_says_now(data_dir, rule, mllp):
    study, result = inferred_study(data_dir)
    destination = hl7_destination(rule, mllp.port)
    profile = with_profile(destination, HL7_PROFILE)
    [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
    deliveries_run_pending()
    profile.hl7_score_code, profile.hl7_study_uid, profile.hl7_patient_id_authority = "CHANGED", "obx-st", "OTHER"
    profile.save()
    Destination.objects.filter(pk=destination.pk).update(
        receiving_facility="ELSEWHERE", hl7_message_type="ORM^O01", accession_field="OBR-3"
    )
    delivery_retry(deliveries=Delivery.objects.filter(pk=delivery.pk), actor="test")
    deliveries_run_pending()
    first, again = mllp.messages
    assert first == again and "AI-SCORE" in again and "OTHER" not in again and "ELSEWHERE" not in again
    assert Delivery.objects.get(pk=delivery.pk).coding["hl7_score_code"] == "AI-SCORE"


def test_a_result_delivered_before_profiles_re_sends_as_it_was_sent(data_dir, rule, mllp):
    """Rows from before this version have no recorded coding: they keep sending the defaults,
    which is what they were sent with, even after the site gives the destination a profile."""
    study, result = inferred_study(data_dir)
    destination = hl7_destination(rule, mllp.port)
    [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
    Delivery.objects.filter(pk=delivery.pk).update(coding={})
    deliveries_run_pending()
    with_profile(destination, HL7_PROFILE)
    delivery_retry(deliveries=Delivery.objects.filter(pk=delivery.pk), actor="test")
    deliveries_run_pending()
    first, again = mllp.messages
    assert first == again and "PL0001^AI triage score^99PACSLENS" in again


# --- DICOM SR -------------------------------------------------------------------------------------


def test_a_dicom_destination_emits_its_profile_in_the_sr(data_dir, rule, orthanc):
    orthanc.clear()
    study, result = inferred_study(data_dir)
    destination = dicom_destination(rule, orthanc.dicom_port, ae_title=orthanc.aet)
    with_profile(destination, SR_PROFILE)
    [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
    deliveries_run_pending()
    delivery.refresh_from_db()
    assert delivery.state == DeliveryState.DELIVERED, delivery.last_error
    (found,) = orthanc.find_instances({"SOPInstanceUID": delivery.idempotency_key})
    sr = hd.sr.srread(io.BytesIO(orthanc.rest_get(f"/instances/{found['ID']}/file")))

    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert (scheme.CodingSchemeDesignator, scheme.CodingSchemeVersion, scheme.CodingSchemeName) == (
        "99HOSP",
        "2025",
        "Hospital AI codes",
    )
    assert scheme.CodingSchemeResponsibleOrganization == "Example Hospital"
    (group,) = sr.content.get_image_measurement_groups()
    (score,) = group.get_measurements()
    assert (score.name.value, score.name.scheme_designator, score.name.meaning) == ("H0001", "99HOSP", "Triage score")
    assert score.name.scheme_version == "2025"
    (flag,) = group.get_qualitative_evaluations()
    assert (flag.name.value, flag.name.scheme_designator, flag.name.meaning) == ("H0002", "99HOSP", "Triage finding")


# --- Validation ------------------------------------------------------------------------------------


def test_a_profile_that_cannot_build_is_refused_with_the_reason():
    destination = Destination(name="pacs", kind="dicom")
    profile = CodingProfile(destination=destination, sr_scheme_designator="HOSP")
    (problem,) = coding_profile_problems(profile, destination)
    assert "must start with 99" in problem
    ris = Destination(name="ris", kind="hl7", hl7_message_type="ORU^R01", hl7_version="2.3")
    assert coding_profile_problems(CodingProfile(destination=ris, hl7_patient_id_type="MR"), ris) == []


# --- YAML --------------------------------------------------------------------------------------------


def test_profiles_export_and_import_round_trip(rule):
    ris = Destination.objects.create(name="ris", kind="hl7", host="ris", port=2575, hl7_message_type="ORU^R01")
    with_profile(ris, HL7_PROFILE)
    exported = yaml.safe_load(config_export())
    (entry,) = exported["coding_profiles"]
    assert entry == {
        "destination": "ris",
        **{f: getattr(ris.coding_profile, f) for f in CodingProfile.fields_for_kind("hl7")},
    }
    CodingProfile.objects.all().delete()
    summary = config_import(yaml.safe_dump(exported))
    assert summary["coding_profiles"] == {"created": 1, "updated": 0, "deleted": 0}
    assert CodingProfile.objects.get().snapshot() == CodingProfile(destination=ris, **HL7_PROFILE).snapshot()


def test_an_import_names_each_bad_profile_field():
    document = {
        "pacslens_config": 1,
        "destinations": [
            {"name": "ris", "kind": "hl7", "host": "ris", "port": 2575, "hl7_message_type": "ORU^R01"},
            {"name": "pacs-web", "kind": "dicomweb", "base_url": "https://pacs.example/dicom-web"},
        ],
        "coding_profiles": [
            {"destination": "ris", "fhir_code_system": "https://x.example"},
            {"destination": "pacs-web", "sr_scheme_designator": "HOSP"},
            {"destination": "nowhere", "hl7_patient_id_type": "MR"},
            {"destination": "ris", "hl7_order_number_fields": "PID-3", "colour": "red"},
            {"destination": ["ris"], "hl7_patient_id_type": "MR"},
            {"destination": "ris", "hl7_order_number_fields": "PID-3"},
        ],
    }
    with pytest.raises(ConfigError) as refused:
        config_import(yaml.safe_dump(document))
    problems = "\n".join(refused.value.problems)
    assert "coding_profiles[0] ('ris'): field(s) fhir_code_system do not apply to a hl7 destination" in problems
    assert "coding_profiles[1] ('pacs-web'): " in problems and "must start with 99" in problems
    assert "coding_profiles[2] ('nowhere'): field 'destination': no destination 'nowhere'" in problems
    assert "coding_profiles[3] ('ris'): unknown field(s) colour" in problems
    assert "coding_profiles[4] (['ris']): field 'destination': give the name of a destination" in problems
    assert "coding_profiles[5] ('ris'): field 'hl7_order_number_fields': Unknown field PID-3" in problems
    assert not Destination.objects.exists(), "nothing applied"


def test_prune_returns_unlisted_destinations_to_the_defaults():
    ris = Destination.objects.create(name="ris", kind="hl7", host="ris", port=2575, hl7_message_type="ORU^R01")
    with_profile(ris, HL7_PROFILE)
    document = yaml.safe_load(config_export())
    document["coding_profiles"] = []
    assert config_import(yaml.safe_dump(document), prune=True)["coding_profiles"]["deleted"] == 1
    assert not CodingProfile.objects.exists()


# --- The page ------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("plain_static_storage")
class TestCodingProfilePage:
    def test_it_shows_only_the_fields_of_the_destination_kind(self, admin):
        ris = Destination.objects.create(name="ris", kind="hl7", host="ris", port=2575, hl7_message_type="ORU^R01")
        page = admin.get(f"/endpoints/destinations/{ris.pk}/coding/").content.decode()
        assert 'name="hl7_patient_id_authority"' in page and 'value="99PACSLENS"' in page
        assert 'name="fhir_code_system"' not in page and 'name="sr_scheme_designator"' not in page
        assert f'href="/endpoints/destinations/{ris.pk}/coding/"' in admin.get("/endpoints/").content.decode()

    def test_saving_stores_and_audits_the_profile(self, admin):
        pacs = Destination.objects.create(name="pacs-web", kind="dicomweb", base_url="https://pacs.example/dicom-web")
        values = {**SR_PROFILE}
        response = admin.post(f"/endpoints/destinations/{pacs.pk}/coding/", values)
        assert response.status_code == 302, response.content.decode()
        assert CodingProfile.objects.get(destination=pacs).sr_scheme_version == "2025"
        entry = AuditEntry.objects.latest("pk")
        assert entry.before["sr_scheme_designator"] == "99PACSLENS" and entry.after["sr_scheme_designator"] == "99HOSP"

    def test_checkboxes_choose_the_order_number_fields(self, admin):
        ris = Destination.objects.create(name="ris", kind="hl7", host="ris", port=2575, hl7_message_type="ORM^O01")
        values = {
            f: getattr(CodingProfile(), f)
            for f in CodingProfile.fields_for_kind("hl7")
            if f != "hl7_order_number_fields"
        }
        values["hl7_order_number_fields"] = ["ORC-2", "OBR-2"]
        assert admin.post(f"/endpoints/destinations/{ris.pk}/coding/", values).status_code == 302
        assert CodingProfile.objects.get().order_number_fields == ["ORC-2", "OBR-2"]

    def test_a_profile_that_would_not_build_is_refused_inline(self, admin):
        pacs = Destination.objects.create(name="pacs-web", kind="dicomweb", base_url="https://pacs.example/dicom-web")
        response = admin.post(
            f"/endpoints/destinations/{pacs.pk}/coding/",
            {**SR_PROFILE, "sr_scheme_designator": "HOSP"},
            HTTP_HX_REQUEST="true",
        )
        body = response.content.decode()
        assert response.status_code == 200 and "must start with 99" in body and "<html" not in body
        assert not CodingProfile.objects.exists()

    def test_a_role_that_cannot_change_destinations_gets_403(self, client, users):
        ris = Destination.objects.create(name="ris", kind="hl7", host="ris", port=2575, hl7_message_type="ORU^R01")
        client.force_login(users["informaticist"])
        assert client.get(f"/endpoints/destinations/{ris.pk}/coding/").status_code == 403


# --- The documentation ----------------------------------------------------------------------------------


DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_documented_hl7_examples_are_what_the_code_builds():
    doc = (DOCS / "hl7-mapping.md").read_text()
    documented = [block.split("```", 1)[0].strip().replace("\n", "\r") for block in doc.split("```hl7\n")[1:]]
    site = yaml.safe_load(doc.split("```yaml\n")[1].split("```", 1)[0])
    entry = {k: v for k, v in site["destinations"][0].items() if k != "kind"}
    profile = {k: v for k, v in site["coding_profiles"][0].items() if k != "destination"}
    built = []
    # The default examples: a destination as created, without a profile.
    for fields, coding in (({"name": "ris"}, {}), (entry, profile)):
        for message_type in ("ORU^R01", "ORM^O01"):
            destination = Destination(kind="hl7", **{**fields, "hl7_message_type": message_type})
            settings = hl7_settings(destination, coding)
            built.append(
                build_hl7_message(
                    result_payload(), message_type=message_type, control_id="AB3DE7QK2M4NP6RS8TUV", settings=settings
                )
            )
    assert documented == [built[0], built[1], built[2], built[3]]
    # The profile in the page is one the import accepts.
    assert coding_profile_problems(CodingProfile(**profile), Destination(kind="hl7", **entry)) == []


def test_the_documented_fhir_profile_examples_are_what_the_code_builds():
    doc = (DOCS / "fhir-mapping.md").read_text()
    blocks = [json.loads(block.split("```", 1)[0]) for block in doc.split("```json\n")[1:]]
    site = yaml.safe_load(doc.split("```yaml\n")[1].split("```", 1)[0])
    profile = {k: v for k, v in site["coding_profiles"][0].items() if k != "destination"}
    settings = fhir_settings(profile)
    identifier = fhir_observation_identifier(
        result_payload().identity, system=profile["fhir_observation_identifier_system"]
    )
    observation = build_observation(result_payload(), settings, identifier=identifier)
    study = build_imaging_study(result_payload(), settings, observation_id="123", identifier=identifier)
    assert blocks[2:] == [observation, study]
    ris = Destination(name="ris-fhir", kind="fhir", base_url="https://ris.example/fhir")
    assert coding_profile_problems(CodingProfile(**profile), ris) == []
