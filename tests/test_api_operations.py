"""The endpoints page's actions through the automation API, over real HTTP to gunicorn: the Test
buttons (a real pynetdicom SCP answering C-ECHO, the MLLP listener, an OAuth token endpoint in
front of Orthanc's DICOMweb) and the integration assessment (a PacsLens listener). Each must give
the answer, the audit row and (destinations) the last-test fields the staff page gives."""

from __future__ import annotations

from datetime import timedelta

import pytest
import requests
import yaml
from django.utils import timezone
from pynetdicom.sop_class import Verification

from pacslens.site_config.document import ConfigError, config_export, config_import
from results.models import CodingProfile, Destination
from routing.models import ApplicationEntity, AuditEntry, OAuthToken, Poll, PollSource, StowSender
from tests.support.mllp import MLLPListener
from tests.support.net import free_port

PROBLEM = "application/problem+json"
ADMIN = "pacs_administrator"
CLIENT_ID, CLIENT_SECRET = "pacslens-gateway", "client-s3cret-value"


def problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == PROBLEM
    return response.json()


class TestAeTitle:
    def test_c_echo_a_live_node_then_a_dead_one(self, api, scp_factory):
        scp = scp_factory(sop_classes=(Verification,))
        entity = ApplicationEntity.objects.create(ae_title="TESTSCP", host="127.0.0.1", port=scp.port)

        response = api.call(ADMIN, "POST", f"/config/ae-titles/{entity.pk}/test")

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "success" and body["ok"] is True and body["name"] == "C-ECHO"
        assert body["seconds"] >= 0 and body["tested_at"]
        audit = AuditEntry.objects.get(action="test", object_id=str(entity.pk))
        assert audit.actor == "api:test-pacs_administrator" and audit.detail.startswith("ok")

        ApplicationEntity.objects.filter(pk=entity.pk).update(port=free_port())
        body = api.call(ADMIN, "POST", f"/config/ae-titles/{entity.pk}/test").json()
        assert body["status"] == "failed" and "cannot connect" in body["in_words"]
        assert AuditEntry.objects.filter(action="test", detail__startswith="failed").count() == 1

    def test_a_node_without_an_address_is_a_409_with_the_page_message_and_audited(self, api):
        entity = ApplicationEntity.objects.create(ae_title="SENDER")
        body = problem(api.call(ADMIN, "POST", f"/config/ae-titles/{entity.pk}/test"), 409)
        assert body["detail"] == "This AE title has no host and port: edit it to add one, then test again."
        assert AuditEntry.objects.get(action="test").detail == body["detail"]
        problem(api.call(ADMIN, "POST", f"/config/ae-titles/{entity.pk}/assess"), 409)
        problem(api.call(ADMIN, "POST", "/config/ae-titles/999999/test"), 404)

    def test_assess_a_live_node(self, api, scp_factory):
        scp = scp_factory(sop_classes=(Verification,))
        entity = ApplicationEntity.objects.create(ae_title="TESTSCP", host="127.0.0.1", port=scp.port)

        response = api.call(ADMIN, "POST", f"/config/ae-titles/{entity.pk}/assess")

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["node"] == "TESTSCP" and body["report"].startswith("Integration assessment of TESTSCP")
        echo = next(p for p in body["probes"] if p["name"] == "C-ECHO")
        assert echo["ok"] is True, body["probes"]
        assert body["ingestion"] and body["results"] and body["it_actions"]
        assert AuditEntry.objects.get(action="test").detail == "integration assessment"


class TestDestination:
    def test_the_mllp_probe_keeps_the_last_test_as_the_page_does(self, api):
        server = MLLPListener()
        try:
            destination = Destination.objects.create(
                name="ris", kind="hl7", host="127.0.0.1", port=server.port, hl7_message_type="ORU^R01"
            )
            body = api.call(ADMIN, "POST", f"/config/destinations/{destination.pk}/test").json()
            assert body["status"] == "success" and f"127.0.0.1:{server.port} accepted" in body["in_words"]
        finally:
            server.server.shutdown()
            server.server.server_close()
        destination.refresh_from_db()
        assert destination.last_test_ok is True and destination.last_test_detail == body["in_words"]

        body = api.call(ADMIN, "POST", f"/config/destinations/{destination.pk}/test").json()
        assert body["status"] == "failed" and "cannot connect" in body["in_words"]
        destination.refresh_from_db()
        assert destination.last_test_ok is False and destination.last_test_failed
        assert AuditEntry.objects.filter(action="test", object_id=str(destination.pk)).count() == 2

    def test_an_incomplete_destination_is_a_409_and_a_failed_last_test(self, api):
        destination = Destination.objects.create(name="ris", kind="hl7", hl7_message_type="ORU^R01")
        body = problem(api.call(ADMIN, "POST", f"/config/destinations/{destination.pk}/test"), 409)
        assert body["detail"].startswith("Fix the configuration first:")
        destination.refresh_from_db()
        assert destination.last_test_ok is False and destination.last_test_detail == body["detail"]
        assert AuditEntry.objects.get(action="test").detail == body["detail"]

    @pytest.mark.interop
    def test_oauth_fetches_a_token_with_the_destinations_credentials(
        self, api, orthanc, oauth_gateway_factory, oauth_ca
    ):
        gateway = oauth_gateway_factory(upstream=orthanc.dicomweb_url, lifetime=60)
        gateway.register(CLIENT_ID, CLIENT_SECRET)
        destination = Destination(
            name="cloud",
            kind="dicomweb",
            base_url=gateway.url,
            auth="oauth2",
            oauth_token_url=gateway.token_url,
            oauth_client_id=CLIENT_ID,
            oauth_client_secret=CLIENT_SECRET,
            ca_bundle=oauth_ca.bundle,
            timeout_seconds=10,
        )
        destination.full_clean()
        destination.save()

        body = api.call(ADMIN, "POST", f"/config/destinations/{destination.pk}/test").json()
        assert body["status"] == "success" and body["name"] == "QIDO-RS", body
        assert len(gateway.token_requests) == 1

        gateway.revoke_client(CLIENT_ID)
        OAuthToken.objects.all().delete()
        body = api.call(ADMIN, "POST", f"/config/destinations/{destination.pk}/test").json()
        assert body["status"] == "failed" and body["summary"] == "no OAuth token" and "invalid_client" in body["reason"]
        destination.refresh_from_db()
        assert destination.last_test_ok is False and "no OAuth token" in destination.last_test_detail
        assert CLIENT_SECRET not in str(list(AuditEntry.objects.values_list("detail", flat=True)))


class TestPollSource:
    def test_a_dimse_source_echoes_its_pacs(self, api, scp_factory):
        scp = scp_factory(sop_classes=(Verification,))
        pacs = ApplicationEntity.objects.create(ae_title="TESTSCP", host="127.0.0.1", port=scp.port)
        source = PollSource.objects.create(name="pacs-poll", kind="dimse", pacs=pacs)
        body = api.call(ADMIN, "POST", f"/config/poll-sources/{source.pk}/test").json()
        assert body["status"] == "success" and body["name"] == "C-ECHO"
        assert AuditEntry.objects.get(action="test", object_id=str(source.pk)).detail.startswith("ok")

        source_without = PollSource.objects.create(name="orphan", kind="dimse")
        body = problem(api.call(ADMIN, "POST", f"/config/poll-sources/{source_without.pk}/test"), 409)
        assert body["detail"] == "The source has no PACS: choose its AE title."

    def test_other_roles_may_not_test(self, api):
        source = PollSource.objects.create(name="orphan", kind="dimse")
        for role in ("informaticist", "auditor"):
            problem(api.call(role, "POST", f"/config/poll-sources/{source.pk}/test"), 403)
        assert not AuditEntry.objects.filter(action="test").exists()


class TestStowSenders:
    def test_create_shows_the_token_once_it_authenticates_then_revoke_refuses_it(self, api):
        ApplicationEntity.objects.create(ae_title="CTSCANNER")
        response = api.call(ADMIN, "POST", "/stow-senders", json={"name": "CT1", "ae_title": "CTSCANNER"})
        assert response.status_code == 201, response.text
        created = response.json()
        token = created["token"]
        assert token.startswith("plstow_") and created["token_hint"] == token[:11] and created["active"]
        assert response.headers["Location"].endswith(f"/api/v1/stow-senders/{created['id']}")
        listed = api.call(ADMIN, "GET", "/stow-senders").json()
        assert [s["name"] for s in listed] == ["CT1"] and "token" not in listed[0]
        assert listed[0]["ae_title"] == "CTSCANNER"

        def stow(bearer: str) -> int:
            headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "text/plain"}
            return requests.post(f"{api.url}/dicomweb/studies", data=b"x", headers=headers, timeout=10).status_code

        assert stow(token) not in (401, 403)
        revoked = api.call(ADMIN, "POST", f"/stow-senders/{created['id']}/revoke")
        assert revoked.status_code == 200 and revoked.json()["active"] is False
        assert stow(token) == 401
        body = problem(api.call(ADMIN, "POST", f"/stow-senders/{created['id']}/revoke"), 409)
        assert body["detail"] == "sender 'CT1' was already revoked"

        # Audited by the access audit, as from the command, with the API client as the actor.
        rows = AuditEntry.objects.filter(object_type="routing.stowsender").order_by("at", "id")
        assert [(r.actor, r.detail) for r in rows] == [
            ("api:test-pacs_administrator", "stow sender created"),
            ("api:test-pacs_administrator", "stow sender token revoked"),
        ]
        assert token not in str([(r.before, r.after, r.detail) for r in rows])

    def test_bad_names_and_unknown_ae_titles_are_named_and_a_name_is_never_reused(self, api):
        body = problem(api.call(ADMIN, "POST", "/stow-senders", json={"name": "X" * 17}), 422)
        assert body["field"] == "name"
        body = problem(api.call(ADMIN, "POST", "/stow-senders", json={"name": "CT1", "ae_title": "NOPE"}), 422)
        assert body["field"] == "ae_title" and "no AE title 'NOPE'" in body["detail"]
        assert api.call(ADMIN, "POST", "/stow-senders", json={"name": "CT1"}).status_code == 201
        body = problem(api.call(ADMIN, "POST", "/stow-senders", json={"name": "CT1"}), 409)
        assert body["field"] == "name" and "exists" in body["detail"]
        assert StowSender.objects.count() == 1


class TestFailingPollSources:
    @pytest.fixture
    def failing(self, db) -> PollSource:
        pacs = ApplicationEntity.objects.create(ae_title="OLDPACS", host="127.0.0.1", port=free_port())
        source = PollSource.objects.create(
            name="old-pacs",
            kind="dimse",
            pacs=pacs,
            consecutive_failures=4,
            next_poll_at=timezone.now() + timedelta(hours=1),
        )
        Poll.objects.create(source=source, status=Poll.Status.FAILED, error="cannot connect to 127.0.0.1")
        return source

    def test_list_then_poll_now_skips_the_backoff_once_audited(self, api, failing):
        listed = api.call("informaticist", "GET", "/poll-sources/failing").json()
        assert [(s["id"], s["consecutive_failures"], s["last_poll_status"]) for s in listed] == [
            (failing.pk, 4, "failed")
        ]
        assert "cannot connect" in listed[0]["last_poll_error"]

        response = api.call("informaticist", "POST", f"/poll-sources/{failing.pk}/poll-now")

        assert response.status_code == 202, response.text
        assert response.json()["detail"] == "old-pacs will be polled within a minute."
        failing.refresh_from_db()
        assert failing.next_poll_at <= timezone.now()
        audit = AuditEntry.objects.get(action="retry", object_id=str(failing.pk))
        assert audit.actor == "api:test-informaticist" and audit.detail == "poll now, after 4 failed polls"
        problem(api.call(ADMIN, "POST", f"/poll-sources/{failing.pk}/poll-now"), 403)

    def test_stop_needs_a_reason_then_disables_it_once(self, api, failing):
        body = problem(api.call(ADMIN, "POST", f"/poll-sources/{failing.pk}/stop", json={"reason": "  "}), 422)
        assert body["errors"] == [{"field": "reason", "detail": "A reason is required to stop polling a source."}]
        problem(api.call("informaticist", "POST", f"/poll-sources/{failing.pk}/stop", json={"reason": "x"}), 403)

        response = api.call(ADMIN, "POST", f"/poll-sources/{failing.pk}/stop", json={"reason": "PACS retired"})

        assert response.status_code == 200 and response.json()["detail"] == "old-pacs is no longer polled."
        failing.refresh_from_db()
        assert not failing.enabled
        audit = AuditEntry.objects.get(action="disable", object_id=str(failing.pk))
        assert audit.detail == "stopped polling after 4 failed polls; reason: PACS retired"
        assert audit.actor == "api:test-pacs_administrator"
        assert api.call("informaticist", "GET", "/poll-sources/failing").json() == []
        body = problem(api.call(ADMIN, "POST", f"/poll-sources/{failing.pk}/stop", json={"reason": "again"}), 409)
        assert body["detail"] == "old-pacs was already off."
        problem(api.call("informaticist", "POST", f"/poll-sources/{failing.pk}/poll-now"), 409)


class TestCodingProfile:
    def test_read_the_defaults_then_replace_with_if_match_as_the_yaml_section(self, api):
        ris = Destination.objects.create(
            name="ris", kind="hl7", host="127.0.0.1", port=2575, hl7_message_type="ORU^R01"
        )
        path = f"/config/destinations/{ris.pk}/coding"
        read = api.call(ADMIN, "GET", path)
        assert read.status_code == 200, read.text
        body = read.json()
        assert body["stored"] is False and body["entry"]["destination"] == "ris"
        assert set(body["entry"]) - {"destination"} == set(CodingProfile.fields_for_kind("hl7"))
        assert read.headers["ETag"] == body["etag"]

        change = {"hl7_patient_id_authority": "HOSP", "hl7_patient_id_type": "MR", "hl7_study_uid": "zds"}
        problem(api.call(ADMIN, "PUT", path, json=change), 428)
        problem(api.call(ADMIN, "PUT", path, json=change, headers={"If-Match": '"stale"'}), 412)
        # Refused as the YAML import refuses the same entry, field named, message alike.
        bad = {"hl7_order_number_fields": "PID-3", "fhir_code_system": "http://x"}
        body = problem(api.call(ADMIN, "PUT", path, json=bad, headers={"If-Match": read.json()["etag"]}), 422)
        with pytest.raises(ConfigError) as refused:
            config_import(yaml.safe_dump({"pacslens_config": 1, "coding_profiles": [{"destination": "ris", **bad}]}))
        assert body["detail"] in " ".join(refused.value.problems)
        assert "do not apply to a hl7 destination" in body["detail"]
        body = problem(
            api.call(
                ADMIN, "PUT", path, json={"hl7_order_number_fields": "PID-3"}, headers={"If-Match": read.json()["etag"]}
            ),
            422,
        )
        assert body["field"] == "hl7_order_number_fields" and "Unknown field PID-3" in body["detail"]
        assert not CodingProfile.objects.exists()

        saved = api.call(ADMIN, "PUT", path, json=change, headers={"If-Match": read.json()["etag"]})

        assert saved.status_code == 200, saved.text
        assert saved.json()["stored"] is True and saved.json()["etag"] != read.json()["etag"]
        profile = CodingProfile.objects.get(destination=ris)
        assert (profile.hl7_patient_id_authority, profile.hl7_study_uid) == ("HOSP", "zds")
        exported = yaml.safe_load(config_export())["coding_profiles"]
        assert exported == [saved.json()["entry"]]
        audit = AuditEntry.objects.get(action="update", object_type="results.codingprofile")
        assert audit.actor == "api:test-pacs_administrator" and audit.after["hl7_patient_id_authority"] == "HOSP"
        # The old ETag no longer matches; fields left out go back to their defaults.
        problem(api.call(ADMIN, "PUT", path, json={}, headers={"If-Match": read.json()["etag"]}), 412)
        again = api.call(ADMIN, "PUT", path, json={}, headers={"If-Match": saved.json()["etag"]})
        assert again.status_code == 200 and again.json()["entry"] == read.json()["entry"]
        problem(api.call("informaticist", "GET", path), 403)
