"""The automation API's resources over real HTTP to gunicorn: studies (filters, cursor pages that
hold while studies arrive, the study_status document), the failure-queue actions, the triage
audit, configuration (the YAML import's validation, ETags), the site YAML and health; and the
problem+json answers."""

from __future__ import annotations

import json
import os
import re
import subprocess
from io import StringIO
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command
from django.utils import timezone

from pacslens.site_config.document import ConfigError, config_import
from results.models import Delivery, Destination
from routing.models import ApplicationEntity, AuditAction, AuditEntry, PollSource, RoutingRule, Study, StudyRetrieve
from tests.support.factories import make_destination, make_failed_delivery, make_result, make_study
from tests.support.postgres import database_url_of

PROBLEM = "application/problem+json"
REPO = Path(__file__).resolve().parent.parent


def problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["instance"].startswith("/api/v1/")
    return body


class TestStudies:
    def test_pages_hold_while_studies_arrive(self, api):
        first = [make_study(accession=f"A{i}", minutes_ago=100 - i) for i in range(7)]
        # Two studies received in the same instant: the id breaks the tie.
        Study.objects.filter(pk=first[3].pk).update(first_received_at=first[4].first_received_at)
        seen: list[int] = []
        page = api.call("auditor", "GET", "/studies", params={"limit": 3}).json()
        seen += [s["id"] for s in page["items"]]
        for i in range(3):  # newer studies arrive between page requests
            make_study(accession=f"NEW{i}", minutes_ago=1)
        while page["next_cursor"]:
            page = api.call("auditor", "GET", "/studies", params={"limit": 3, "cursor": page["next_cursor"]}).json()
            seen += [s["id"] for s in page["items"]]
        assert seen == sorted(
            (s.pk for s in first), key=lambda pk: (Study.objects.get(pk=pk).first_received_at, pk), reverse=True
        )
        assert len(set(seen)) == 7

    def test_filters_are_the_ui_filters(self, api, pipeline):
        def ids(**params):
            response = api.call("informaticist", "GET", "/studies", params=params)
            assert response.status_code == 200, response.text
            return {s["id"] for s in response.json()["items"]}

        done, failed = pipeline["done"].pk, pipeline["failed"].pk
        assert ids() == {done, failed}
        assert ids(state="failed") == {failed}
        assert ids(q="ACC100") == {done}
        assert ids(q=pipeline["failed"].study_instance_uid) == {failed}
        assert ids(flag="yes") == {done, failed}
        assert ids(modality="MR") == set()
        assert ids(calling_ae="modality1") == {done, failed}
        today = timezone.now().date().isoformat()
        assert ids(received_from=today, received_to=today) == {done, failed}
        body = problem(api.call("informaticist", "GET", "/studies", params={"received_from": "yesterday"}), 422)
        assert body["field"] == "received_from"
        assert body["errors"] == [{"field": "received_from", "detail": "Enter a valid date."}]
        problem(api.call("informaticist", "GET", "/studies", params={"cursor": "bm9wZQ"}), 422)
        problem(api.call("informaticist", "GET", "/studies", params={"limit": 0}), 422)

    def test_detail_is_the_study_status_document(self, api, pipeline):
        study = pipeline["failed"]
        response = api.call("informaticist", "GET", f"/studies/{study.pk}")
        assert response.status_code == 200
        out = StringIO()
        call_command("study_status", study.study_instance_uid, "--json", stdout=out)
        expected = json.loads(out.getvalue())
        got = response.json()
        assert got == expected  # one serializer, byte for byte
        assert "patient" not in response.text.lower() and "ZZTEST" not in response.text
        problem(api.call("informaticist", "GET", "/studies/999999"), 404)


class TestActions:
    def test_rerun_uses_the_service_and_is_audited(self, api, pipeline):
        study = pipeline["done"]
        response = api.call("informaticist", "POST", f"/studies/{study.pk}/rerun")
        assert response.status_code == 202, response.text
        study.refresh_from_db()
        assert study.state == "complete"
        assert AuditEntry.objects.filter(
            actor="api:test-informaticist", action="rerun", object_id=str(study.pk)
        ).exists()
        body = problem(api.call("informaticist", "POST", f"/studies/{study.pk}/rerun"), 409)
        assert body["detail"] == "The study is complete: wait until the pipeline is done with it."

    def test_retry_and_discard_failed_deliveries(self, api, pipeline):
        delivery = pipeline["delivery"]
        listed = api.call("informaticist", "GET", "/deliveries", params={"destination": pipeline["destination"].pk})
        assert [d["id"] for d in listed.json()] == [delivery.pk]
        assert listed.json()[0]["idempotency_key"] == delivery.idempotency_key

        response = api.call("informaticist", "POST", f"/deliveries/{delivery.pk}/retry")
        assert response.status_code == 202, response.text
        delivery.refresh_from_db()
        assert (
            delivery.state == "pending"
            and delivery.idempotency_key == f"PL{delivery.result_id}D{delivery.destination_id}"
        )
        assert AuditEntry.objects.filter(
            actor="api:test-informaticist", action="retry", object_id=str(delivery.pk)
        ).exists()
        problem(api.call("informaticist", "POST", f"/deliveries/{delivery.pk}/retry"), 409)

        # Every failed delivery of one destination, and only those.
        other = make_destination("other-ris", port=2576)
        study = make_study(accession="ACC300", state="failed")
        result = make_result(study)
        mine = [make_failed_delivery(study, result, pipeline["destination"])]
        theirs = make_failed_delivery(study, result, other)
        response = api.call(
            "informaticist", "POST", "/deliveries/retry", json={"destination": pipeline["destination"].pk}
        )
        assert response.status_code == 202 and response.json()["ids"] == [d.pk for d in mine]
        assert Delivery.objects.get(pk=theirs.pk).state == "failed"

        body = problem(
            api.call("informaticist", "POST", f"/deliveries/{theirs.pk}/discard", json={"reason": "  "}), 422
        )
        assert body["errors"] == [{"field": "reason", "detail": "A reason is required to discard a delivery."}]
        body = problem(api.call("informaticist", "POST", f"/deliveries/{theirs.pk}/discard", json={}), 422)
        assert body["field"] == "reason"
        response = api.call("informaticist", "POST", f"/deliveries/{theirs.pk}/discard", json={"reason": "RIS retired"})
        assert response.status_code == 200, response.text
        theirs.refresh_from_db()
        assert theirs.state == "discarded" and theirs.discarded_by == "api:test-informaticist"
        assert AuditEntry.objects.get(action="discard", object_id=str(theirs.pk)).detail == "reason: RIS retired"
        problem(api.call("informaticist", "POST", f"/deliveries/{theirs.pk}/discard", json={"reason": "again"}), 409)

    def test_redeliver_a_study(self, api, pipeline):
        study = pipeline["failed"]
        response = api.call("informaticist", "POST", f"/studies/{study.pk}/redeliver")
        assert response.status_code == 202, response.text
        assert response.json()["ids"] == [pipeline["delivery"].pk]
        assert Delivery.objects.get(pk=pipeline["delivery"].pk).state == "pending"

    def test_retry_and_discard_a_failed_retrieve(self, api, pipeline):
        source = PollSource.objects.create(name="pacs-poll", kind="dimse", pacs=pipeline["entity"])
        record = StudyRetrieve.objects.create(source=source, study_instance_uid="1.2.3", state="failed", attempts=5)
        other = StudyRetrieve.objects.create(source=source, study_instance_uid="1.2.4", state="failed", attempts=5)
        assert sorted(r["id"] for r in api.call("pacs_administrator", "GET", "/retrieves").json()) == [
            record.pk,
            other.pk,
        ]
        response = api.call("informaticist", "POST", f"/retrieves/{record.pk}/retry")
        assert response.status_code == 202, response.text
        record.refresh_from_db()
        assert record.state == "pending" and record.attempts == 0 and record.next_attempt_at <= timezone.now()
        assert AuditEntry.objects.filter(action=AuditAction.RETRY, object_id=str(record.pk)).count() == 1
        problem(api.call("informaticist", "POST", f"/retrieves/{record.pk}/retry"), 409)

        problem(api.call("informaticist", "POST", f"/retrieves/{other.pk}/discard", json={"reason": " "}), 422)
        response = api.call("informaticist", "POST", f"/retrieves/{other.pk}/discard", json={"reason": "study deleted"})
        assert response.status_code == 200, response.text
        other.refresh_from_db()
        assert other.state == "discarded" and other.discard_reason == "study deleted"


class TestTriageAudit:
    def test_results_are_filtered_and_every_read_is_audited(self, api, pipeline):
        response = api.call("auditor", "GET", "/results", params={"score_min": "0.5"})
        assert response.status_code == 200
        scores = [r["score"] for r in response.json()["items"]]
        assert scores and all(s >= 0.5 for s in scores)
        entry = AuditEntry.objects.filter(actor="api:test-auditor", action="view_audit").latest("id")
        assert "score_min=0.5" in entry.detail
        body = problem(api.call("auditor", "GET", "/results", params={"score_min": "0.9", "score_max": "0.1"}), 422)
        assert body["errors"] == [{"field": "score_max", "detail": "The maximum score is below the minimum."}]
        one = api.call("auditor", "GET", f"/results/{pipeline['delivery'].result_id}")
        assert one.status_code == 200 and one.json()["current"] is True
        assert AuditEntry.objects.filter(action="view_audit", object_id=str(pipeline["delivery"].result_id)).exists()


class TestConfiguration:
    def test_ae_title_lifecycle_with_etags(self, api):
        created = api.call(
            "pacs_administrator",
            "POST",
            "/config/ae-titles",
            json={"ae_title": "CT01", "host": "10.1.2.3", "port": 104, "may_send": True},
        )
        assert created.status_code == 201, created.text
        body = created.json()
        assert created.headers["ETag"] == body["etag"] and created.headers["Location"].endswith(
            f"/config/ae-titles/{body['id']}"
        )
        assert body["entry"]["ae_title"] == "CT01" and body["entry"]["port"] == 104
        url = f"/config/ae-titles/{body['id']}"

        problem(api.call("pacs_administrator", "PATCH", url, json={"port": 105}), 428)
        body412 = problem(
            api.call("pacs_administrator", "PATCH", url, json={"port": 105}, headers={"If-Match": '"stale"'}), 412
        )
        assert "changed since you read it" in body412["detail"]
        changed = api.call("pacs_administrator", "PATCH", url, json={"port": 105}, headers={"If-Match": body["etag"]})
        assert changed.status_code == 200, changed.text
        assert changed.json()["etag"] != body["etag"] and ApplicationEntity.objects.get(ae_title="CT01").port == 105
        # The first editor's tag is now stale: their change is refused, not applied over the second's.
        problem(
            api.call("pacs_administrator", "PATCH", url, json={"port": 106}, headers={"If-Match": body["etag"]}), 412
        )

        renamed = api.call(
            "pacs_administrator",
            "PUT",
            url,
            json={**changed.json()["entry"], "ae_title": "CT02"},
            headers={"If-Match": changed.json()["etag"]},
        )
        assert renamed.status_code == 200, renamed.text
        assert list(ApplicationEntity.objects.values_list("ae_title", flat=True)) == ["CT02"]
        update = AuditEntry.objects.filter(actor="api:test-pacs_administrator", action="update").latest("id")
        assert update.before["ae_title"] == "CT01" and update.after["ae_title"] == "CT02"

        problem(
            api.call("pacs_administrator", "POST", "/config/ae-titles", json={"ae_title": "CT02", "host": "h"}), 409
        )
        gone = api.call("pacs_administrator", "DELETE", url, headers={"If-Match": renamed.json()["etag"]})
        assert gone.status_code == 204
        assert not ApplicationEntity.objects.exists()
        assert AuditEntry.objects.filter(action="delete", object_repr="CT02").exists()
        problem(api.call("pacs_administrator", "GET", url), 404)

    def test_validation_is_the_yaml_imports_with_the_field_named(self, api):
        entry = {"ae_title": "BAD AE TITLE THAT IS TOO LONG", "host": "10.1.2.3", "port": 70000}
        with pytest.raises(ConfigError) as caught:
            config_import(yaml.safe_dump({"pacslens_config": 1, "ae_titles": [entry]}), dry_run=True)
        body = problem(api.call("pacs_administrator", "POST", "/config/ae-titles", json=entry), 422)
        label = f"ae_titles[0] ({entry['ae_title']!r}): "
        assert [f"{label}field {e['field']!r}: {e['detail']}" for e in body["errors"]] == caught.value.problems
        assert body["field"] == "ae_title"
        assert not ApplicationEntity.objects.exists()
        assert not AuditEntry.objects.filter(action="create", object_type="routing.applicationentity").exists()

    def test_a_rule_naming_an_unknown_model_is_refused(self, api):
        rule = {
            "name": "CT head",
            "models": [{"name": "nope", "version": "1"}],
            "conditions": [{"attribute": "Modality", "operator": "equals", "value": "CT"}],
        }
        body = problem(api.call("pacs_administrator", "POST", "/config/routing-rules", json=rule), 422)
        assert body["field"] == "models[0]" and "no model nope 1" in body["errors"][0]["detail"]
        rule["models"] = []
        created = api.call("pacs_administrator", "POST", "/config/routing-rules", json=rule)
        assert created.status_code == 201, created.text
        assert RoutingRule.objects.get(name="CT head").conditions.count() == 1

    def test_destination_secrets_are_write_only(self, api):
        destination = {
            "name": "fhir-ris",
            "kind": "fhir",
            "base_url": "https://ris.example.org/fhir",
            "auth": "bearer",
            "secret": "s3cr3t-token",
        }
        created = api.call("pacs_administrator", "POST", "/config/destinations", json=destination)
        assert created.status_code == 201, created.text
        assert "s3cr3t-token" not in created.text and "secret" not in created.json()["entry"]
        assert Destination.objects.get(name="fhir-ris").secret == "s3cr3t-token"
        listing = api.call("auditor", "GET", "/config/destinations")
        assert "s3cr3t-token" not in listing.text
        assert "s3cr3t-token" not in json.dumps(list(AuditEntry.objects.values("before", "after", "detail")))

    def test_a_destination_with_deliveries_cannot_be_deleted(self, api, pipeline):
        destination = pipeline["destination"]
        tag = api.call("pacs_administrator", "GET", f"/config/destinations/{destination.pk}").headers["ETag"]
        body = problem(
            api.call(
                "pacs_administrator", "DELETE", f"/config/destinations/{destination.pk}", headers={"If-Match": tag}
            ),
            409,
        )
        assert "still in use" in body["detail"]
        assert Destination.objects.filter(pk=destination.pk).exists()

    def test_site_export_and_import_with_a_dry_run_first(self, api, pipeline):
        exported = api.call("pacs_administrator", "GET", "/config/site")
        assert exported.status_code == 200 and exported.headers["Content-Type"].startswith("application/yaml")
        document = yaml.safe_load(exported.text)
        assert [e["ae_title"] for e in document["ae_titles"]] == ["MODALITY1"]
        assert [e["name"] for e in document["models"]] == ["demo-bleed"]
        del document["models"]  # the factory's model row is no valid manifest (no file): not what this tests
        document["ae_titles"].append({"ae_title": "MR01", "host": "10.0.0.9", "port": 104})
        text = yaml.safe_dump(document)

        dry = api.call(
            "pacs_administrator", "POST", "/config/site/import", data=text, headers={"Content-Type": "application/yaml"}
        )
        assert dry.status_code == 200, dry.text
        assert dry.json()["dry_run"] is True and dry.json()["sections"]["ae_titles"]["created"] == 1
        assert not ApplicationEntity.objects.filter(ae_title="MR01").exists()
        applied = api.call("pacs_administrator", "POST", "/config/site/import", params={"dry_run": "false"}, data=text)
        assert applied.status_code == 200 and applied.json()["dry_run"] is False
        assert ApplicationEntity.objects.filter(ae_title="MR01").exists()
        assert AuditEntry.objects.filter(actor="api:test-pacs_administrator", action="import").exists()

        document["ae_titles"][1]["port"] = "abc"
        body = problem(
            api.call(
                "pacs_administrator",
                "POST",
                "/config/site/import",
                params={"dry_run": "false"},
                data=yaml.safe_dump(document),
            ),
            422,
        )
        assert body["field"] == "ae_titles[1].port" and "nothing was changed" in body["detail"]
        assert ApplicationEntity.objects.get(ae_title="MR01").port == 104
        body = problem(api.call("pacs_administrator", "POST", "/config/site/import", data="{not yaml"), 422)
        assert "not valid YAML" in body["errors"][0]["detail"]

    def test_models_and_dry_run_read(self, api, pipeline):
        models = api.call("auditor", "GET", "/config/models").json()
        assert [m["entry"]["name"] for m in models] == ["demo-bleed"]
        runs = api.call("auditor", "GET", "/config/routing-rules/dry-run", params={"study": pipeline["done"].pk}).json()
        assert runs[0]["study_id"] == pipeline["done"].pk and runs[0]["verdicts"][0]["rule"] == "CT head"


class TestHealth:
    def test_health_and_queue_depth(self, api, pipeline):
        body = api.call("auditor", "GET", "/health").json()
        assert body["status"] in ("ok", "warn", "down") and body["checks"]["database"]["status"] == "ok"
        assert body["queue"]["tasks"] >= 0
        assert body["queue"]["studies"]["failed"]["now"] == 1
        assert body["queue"]["deliveries"] == [
            {"destination_id": pipeline["destination"].pk, "name": "ris", "pending": 0, "failed": 1}
        ]


def test_a_wrong_body_is_a_problem_naming_the_field(api, pipeline):
    body = problem(api.call("informaticist", "POST", "/deliveries/retry", json={"destination": "one"}), 422)
    assert body["field"] == "destination"
    body = problem(
        api.call(
            "informaticist", "POST", "/deliveries/retry", data="not json", headers={"Content-Type": "application/json"}
        ),
        400,
    )
    assert body["detail"] == "Cannot parse request body"


class TestGuide:
    """docs/api.md's five-minute script, run as written against the server."""

    def guide_block(self, heading: str, api, destination: int) -> str:
        text = (REPO / "docs" / "api.md").read_text()
        block = re.compile(r"```\w+\n(.*?)```", re.DOTALL).search(text, text.index(heading))[1]
        return (
            block.replace("http://localhost:8000", api.url)
            .replace("destination=3", f"destination={destination}")
            .replace('"destination": 3', f'"destination": {destination}')
            .replace("destination = 3", f"destination = {destination}")
        )

    def test_the_python_script_runs(self, api, pipeline, capsys):
        code = self.guide_block("## The same in Python", api, pipeline["destination"].pk)
        code = code.replace("plapi_...", api.tokens["informaticist"])
        exec(compile(code, "docs/api.md", "exec"), {})
        out = capsys.readouterr().out
        assert "1 failed deliveries: {'permanent'}" in out and "1 delivery queued again." in out
        assert Delivery.objects.get(pk=pipeline["delivery"].pk).state == "pending"

    def test_the_curl_script_runs(self, api, pipeline, settings):
        script = self.guide_block("## Five minutes with curl", api, pipeline["destination"].pk)
        env = {
            **os.environ,
            "DATABASE_URL": database_url_of(settings.DATABASES["default"]),
            "PACSLENS_DATA_DIR": str(settings.DATA_DIR),
        }
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.rstrip().endswith(f'"queued": 1, "ids": [{pipeline["delivery"].pk}]}}'), done.stdout[-500:]
        assert Delivery.objects.get(pk=pipeline["delivery"].pk).state == "pending"
        assert AuditEntry.objects.filter(actor="api:ops-script", action="retry").exists()
