"""Who may call what on the automation API, over real HTTP to gunicorn: the permission matrix
(role x endpoint x method), tokens (expiry, revocation, last use), no session authentication,
the docs page served locally, the published schema, the token command and the clients page."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
import requests
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.utils import timezone
from openapi_spec_validator import validate

from pacslens.api.endpoints import alerts as api_alerts
from pacslens.api.endpoints import coding as api_coding
from pacslens.api.endpoints import deliveries as api_deliveries
from pacslens.api.endpoints import probes as api_probes
from pacslens.api.endpoints import studies as api_studies
from pacslens.api.main import api as ninja_api
from pacslens.api.models import ApiClient, ApiToken
from pacslens.api.services import api_client_create
from pacslens.staff.views import alerts as staff_alerts
from pacslens.staff.views import coding as staff_coding
from pacslens.staff.views import destinations as staff_destinations
from pacslens.staff.views import endpoints as staff_endpoints
from pacslens.staff.views import failures, retrieves, study_actions
from pacslens.staff.views import studies as staff_studies
from results.models import AlertChannel, AlertRule, WebhookSubscription
from routing.models import AuditEntry, PollSource, StowSender, StudyRetrieve
from tests.support.api import API_ROLES, api_groups_ensure
from tests.support.factories import PASSWORD, make_user
from tests.support.web import gunicorn_run

REPO = Path(__file__).resolve().parent.parent
ADMIN = {"pacs_administrator"}
INFORMATICIST = {"informaticist"}
AUDITOR = {"auditor"}
EVERYONE = set(API_ROLES)
CONFIG_KINDS = ("ae-titles", "destinations", "routing-rules", "poll-sources")
ALERT_KINDS = ("alert-channels", "alert-rules")


def matrix(p: dict) -> list[tuple[str, str, dict, set[str]]]:
    """(method, path, request kwargs, roles allowed). Bodies make allowed calls fail validation
    where a success would change what later rows test."""
    rows = [
        ("GET", "/studies", {}, EVERYONE),
        ("GET", f"/studies/{p['done'].pk}", {}, EVERYONE),
        ("POST", f"/studies/{p['done'].pk}/rerun", {}, INFORMATICIST),
        ("POST", f"/studies/{p['failed'].pk}/redeliver", {}, INFORMATICIST),
        ("GET", "/deliveries", {}, EVERYONE),  # PACS administrators see the queue, read-only
        ("POST", "/deliveries/retry", {"json": {}}, INFORMATICIST),
        ("POST", f"/deliveries/{p['delivery'].pk}/retry", {}, INFORMATICIST),
        ("POST", f"/deliveries/{p['delivery'].pk}/discard", {"json": {"reason": ""}}, INFORMATICIST),
        ("GET", "/retrieves", {}, ADMIN | INFORMATICIST),  # as the failure queue's retrieve section
        ("POST", f"/retrieves/{p['retrieve'].pk}/retry", {}, INFORMATICIST),
        ("POST", f"/retrieves/{p['retrieve'].pk}/discard", {"json": {"reason": ""}}, INFORMATICIST),
        ("GET", "/results", {}, AUDITOR),
        ("GET", f"/results/{p['result'].pk}", {}, AUDITOR),
        ("GET", "/config/models", {}, ADMIN | AUDITOR),
        ("GET", f"/config/models/{p['result'].model_id}", {}, ADMIN | AUDITOR),
        ("GET", "/config/routing-rules/dry-run", {}, ADMIN | AUDITOR),
        ("GET", "/config/site", {}, ADMIN | AUDITOR),
        ("POST", "/config/site/import", {"data": "pacslens_config: 1\n"}, ADMIN),
        ("GET", "/health", {}, EVERYONE),
        # Webhooks: configuration like destinations (invalid bodies, so an allowed call changes nothing).
        ("GET", "/webhooks", {}, ADMIN | AUDITOR),
        ("POST", "/webhooks", {"json": {"name": "w", "url": "ftp://bad"}}, ADMIN),
        ("GET", f"/webhooks/{p['webhook'].pk}", {}, ADMIN | AUDITOR),
        ("PATCH", f"/webhooks/{p['webhook'].pk}", {"json": {}}, ADMIN),
        ("DELETE", f"/webhooks/{p['webhook'].pk}", {}, ADMIN),
        ("GET", f"/webhooks/{p['webhook'].pk}/events", {}, ADMIN | AUDITOR),
        # The endpoints page's Test buttons and Assess (nodes that refuse: quick answers).
        ("POST", f"/config/ae-titles/{p['ae-titles'].pk}/test", {}, ADMIN),
        ("POST", f"/config/ae-titles/{p['ae-titles'].pk}/assess", {}, ADMIN),
        ("POST", f"/config/destinations/{p['destinations'].pk}/test", {}, ADMIN),
        ("POST", f"/config/poll-sources/{p['poll-sources'].pk}/test", {}, ADMIN),
        # STOW-RS senders (an invalid name: an allowed create changes nothing).
        ("GET", "/stow-senders", {}, ADMIN),
        ("POST", "/stow-senders", {"json": {"name": ""}}, ADMIN),
        ("GET", f"/stow-senders/{p['stow-sender'].pk}", {}, ADMIN),
        ("POST", f"/stow-senders/{p['stow-sender'].pk}/revoke", {}, ADMIN),
        # Failing poll sources (the failure queue's section; an empty reason: a stop changes nothing).
        ("GET", "/poll-sources/failing", {}, ADMIN | INFORMATICIST),
        ("POST", f"/poll-sources/{p['poll-sources'].pk}/poll-now", {}, INFORMATICIST),
        ("POST", f"/poll-sources/{p['poll-sources'].pk}/stop", {"json": {"reason": ""}}, ADMIN),
        # A destination's coding profile: the page needs view and change, so auditors do not read it.
        ("GET", f"/config/destinations/{p['destinations'].pk}/coding", {}, ADMIN),
        ("PUT", f"/config/destinations/{p['destinations'].pk}/coding", {"json": {}}, ADMIN),
        # The Alerts page: its status and Send test alert (to a port that refuses).
        ("GET", "/alerts/active", {}, ADMIN),
        ("GET", "/alerts/events", {}, ADMIN),
        ("POST", f"/config/alert-channels/{p['alert-channels'].pk}/test", {}, ADMIN),
    ]
    # Alert channels and rules: the Alerts page is PACS administrators' alone.
    readers = {kind: ADMIN if kind in ALERT_KINDS else ADMIN | AUDITOR for kind in CONFIG_KINDS + ALERT_KINDS}
    for kind in CONFIG_KINDS + ALERT_KINDS:
        item = f"/config/{kind}/{p[kind].pk}"
        rows += [
            ("GET", f"/config/{kind}", {}, readers[kind]),
            ("POST", f"/config/{kind}", {"json": {}}, ADMIN),
            ("GET", item, {}, readers[kind]),
            # Without If-Match: 428 for a role that may, 403 for one that may not.
            ("PUT", item, {"json": {}}, ADMIN),
            ("PATCH", item, {"json": {}}, ADMIN),
            ("DELETE", item, {}, ADMIN),
        ]
    return rows


@pytest.fixture
def objects(pipeline) -> dict:
    source = PollSource.objects.create(name="pacs-poll", kind="dimse", pacs=pipeline["entity"])
    retrieve = StudyRetrieve.objects.create(source=source, study_instance_uid="1.2.3.4", state="failed", attempts=5)
    return {
        **pipeline,
        "retrieve": retrieve,
        "result": pipeline["done"].inference_results.first(),
        "ae-titles": pipeline["entity"],
        "destinations": pipeline["destination"],
        "routing-rules": pipeline["rule"],
        "poll-sources": source,
        "stow-sender": StowSender.create_with_token(name="CT1")[0],
        "alert-channels": AlertChannel.objects.create(name="hook", kind="webhook", webhook_url="http://127.0.0.1:9/"),
        "alert-rules": AlertRule.objects.create(name="queue", condition="failure_queue"),
        "webhook": WebhookSubscription.objects.create(
            name="engine", webhook_url="https://engine.example.org/hook", secret="s" * 20
        ),
    }


class TestPermissionMatrix:
    def test_every_endpoint_and_method_checks_the_role(self, api, objects):
        rows = matrix(objects)
        assert len(rows) == 41 + 6 * len(CONFIG_KINDS + ALERT_KINDS)
        audit_before = AuditEntry.objects.count()
        for method, path, kwargs, allowed in rows:
            assert api.call(None, method, path, **kwargs).status_code == 401, (method, path)
            assert api.call("plapi_not-a-token", method, path, **kwargs).status_code == 401, (method, path)
            for role in sorted(EVERYONE - allowed):
                response = api.call(role, method, path, **kwargs)
                assert response.status_code == 403, (role, method, path, response.text)
                assert response.headers["Content-Type"] == "application/problem+json"
        assert AuditEntry.objects.count() == audit_before, "a refused call changed or recorded something"
        for method, path, kwargs, allowed in rows:
            for role in sorted(allowed):
                response = api.call(role, method, path, **kwargs)
                assert response.status_code not in (401, 403) and response.status_code < 500, (
                    role,
                    method,
                    path,
                    response.status_code,
                    response.text,
                )

    def test_the_api_requires_the_permissions_the_ui_requires(self):
        assert staff_studies.study_list.staff_permissions == api_studies.VIEW
        assert study_actions.study_rerun_view.staff_permissions == api_studies.RERUN
        assert study_actions.study_redeliver.staff_permissions == api_studies.REDELIVER
        assert failures.failure_queue.staff_permissions == api_deliveries.VIEW
        assert failures.failure_retry.staff_permissions == api_deliveries.RETRY
        assert failures.failure_discard.staff_permissions == api_deliveries.DISCARD
        assert retrieves.failure_source_poll_now.staff_permissions == api_deliveries.SOURCE_POLL_NOW
        assert retrieves.failure_source_stop.staff_permissions == api_deliveries.SOURCE_STOP
        assert staff_coding.destination_coding.staff_permissions == api_coding.CODING
        assert staff_alerts.alert_page.staff_permissions == api_alerts.VIEW
        assert staff_alerts.alert_channel_test.staff_permissions == api_alerts.TEST
        assert staff_endpoints.ae_test.staff_permissions == api_probes.AE_TEST
        assert staff_endpoints.ae_assess.staff_permissions == api_probes.AE_ASSESS
        assert staff_endpoints.poll_source_test.staff_permissions == api_probes.POLL_SOURCE_TEST
        assert staff_destinations.destination_test.staff_permissions == api_probes.DESTINATION_TEST


class TestTokens:
    def test_expired_and_revoked_tokens_are_refused_and_use_is_recorded(self, api):
        client = ApiClient.objects.get(name="test-informaticist")
        token_row = client.tokens.get()
        assert token_row.last_used_at is None
        assert api.call("informaticist", "GET", "/studies").status_code == 200
        token_row.refresh_from_db()
        assert token_row.last_used_at is not None

        ApiToken.objects.filter(pk=token_row.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
        response = api.call("informaticist", "GET", "/studies")
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.json()["status"] == 401

        _, second = client.token_issue(expires_at=timezone.now() + timedelta(days=1))
        api.tokens["second"] = second
        assert api.call("second", "GET", "/studies").status_code == 200
        call_command("api_token", "revoke", client.name, stdout=StringIO())
        assert api.call("second", "GET", "/studies").status_code == 401
        assert AuditEntry.objects.filter(
            action="revoke", object_id=str(client.pk), object_type="api.apiclient"
        ).exists()

    def test_one_revoked_token_leaves_the_others_working(self, api):
        client = ApiClient.objects.get(name="test-auditor")
        old = client.tokens.get()
        _, new = client.token_issue(expires_at=None)
        api.tokens["new"] = new
        call_command("api_token", "revoke", client.name, "--token", old.token_hint, stdout=StringIO())
        assert api.call("auditor", "GET", "/health").status_code == 401
        assert api.call("new", "GET", "/health").status_code == 200


class TestSessionAndDocs:
    def test_a_staff_session_does_not_authenticate_and_the_docs_are_served_locally(
        self, transactional_db, data_dir, settings
    ):
        api_groups_ensure()
        make_user("superuser")
        with gunicorn_run(data_dir=data_dir, database=settings.DATABASES["default"], collectstatic=True) as url:
            browser = requests.Session()
            login = browser.get(f"{url}/login/", timeout=10)
            csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.text)[1]
            browser.post(
                f"{url}/login/",
                data={"username": "root", "password": PASSWORD, "csrfmiddlewaretoken": csrf},
                headers={"Referer": f"{url}/login/"},
                timeout=10,
            )
            assert browser.get(f"{url}/studies/", timeout=10).status_code == 200  # the session is good
            assert browser.get(f"{url}/api/v1/studies", timeout=10).status_code == 401
            assert browser.post(f"{url}/api/v1/studies/1/rerun", timeout=10).status_code == 401

            docs = browser.get(f"{url}/api/v1/docs", timeout=10)
            assert docs.status_code == 200
            sources = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
            assert sources and all(s.startswith("/") for s in sources), sources  # nothing from another host
            assert "<script>" not in docs.text  # no inline script: a strict script-src 'self' holds
            for source in sources:
                assert requests.get(f"{url}{source}", timeout=10).status_code == 200, source
            schema = requests.get(f"{url}/api/v1/openapi.json", timeout=10).json()
            assert schema["components"]["securitySchemes"]["ApiBearer"]["scheme"] == "bearer"


class TestSchema:
    def test_the_schema_is_valid_openapi_and_matches_the_published_copy(self, db):
        schema = json.loads(json.dumps(ninja_api.get_openapi_schema()))
        validate(schema)
        published = json.loads((REPO / "docs" / "api" / "openapi.json").read_text())
        assert schema == published, (
            "docs/api/openapi.json is out of date: .venv/bin/python manage.py export_openapi_schema "
            "--api pacslens.api.main.api --indent 2 --output docs/api/openapi.json"
        )

    def test_every_operation_documents_its_problem_answers(self, db):
        schema = ninja_api.get_openapi_schema()
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                assert {"401", "403", "422"} <= set(operation["responses"]), (method, path)
                assert operation["security"] == [{"ApiBearer": []}], (method, path)


class TestTokenCommand:
    def test_create_list_revoke(self, db):
        api_groups_ensure()
        out, err = StringIO(), StringIO()
        call_command(
            "api_token", "create", "mirth", "--role", "informaticist", "--expires-days", "30", stdout=out, stderr=err
        )
        token = out.getvalue().strip()
        assert token.startswith("plapi_") and "shown only now" in err.getvalue()
        row = ApiToken.authenticate(token)
        assert row is not None and row.client.name == "mirth" and row.expires_at is not None
        assert token not in json.dumps(list(AuditEntry.objects.values("detail", "object_repr", "after")))
        listing = StringIO()
        call_command("api_token", "list", stdout=listing)
        assert (
            "mirth" in listing.getvalue() and row.token_hint in listing.getvalue() and token not in listing.getvalue()
        )
        call_command("api_token", "revoke", "mirth", stdout=StringIO())
        assert ApiToken.authenticate(token) is None
        actions = set(AuditEntry.objects.filter(object_repr__contains="mirth").values_list("action", flat=True))
        assert actions == {"create", "revoke"}

    def test_a_bad_role_or_name_is_refused(self, db):
        with pytest.raises(CommandError, match="invalid choice"):
            call_command("api_token", "create", "x", "--role", "superuser", stderr=StringIO())
        with pytest.raises(CommandError, match="name"):
            call_command("api_token", "create", "bad name!", "--role", "auditor", stdout=StringIO())


@pytest.mark.usefixtures("plain_static_storage")
class TestClientsPage:
    def test_a_superuser_creates_a_client_and_sees_the_token_once(self, client: Client, users):
        api_groups_ensure()
        client.force_login(users["superuser"])
        response = client.post(
            "/api-clients/", {"name": "rhapsody", "role": "pacs_administrator", "expires_in_days": "90"}
        )
        assert response.status_code == 200
        token = re.search(r'id="token-value">([^<]+)<', response.content.decode())[1]
        assert ApiToken.authenticate(token).client.role == "pacs_administrator"
        assert response["Cache-Control"].startswith("max-age=0")
        again = client.get("/api-clients/").content.decode()
        assert "rhapsody" in again and token not in again
        row = ApiClient.objects.get(name="rhapsody")
        assert client.post(f"/api-clients/{row.pk}/revoke/").status_code == 302
        assert ApiToken.authenticate(token) is None
        assert AuditEntry.objects.filter(actor="root", action="revoke", object_id=str(row.pk)).exists()

    def test_a_bad_name_is_shown_next_to_the_field(self, client: Client, users):
        client.force_login(users["superuser"])
        response = client.post("/api-clients/", {"name": "no spaces", "role": "auditor"})
        assert response.status_code == 422
        assert "Letters, digits, dot, dash and underscore" in response.content.decode()
        assert not ApiClient.objects.exists()

    @pytest.mark.parametrize("role", ["admin", "informaticist", "nobody"])
    def test_only_superusers_manage_clients(self, client: Client, users, role):
        existing, _ = api_client_create(name="x", role="auditor", actor="t")
        client.force_login(users[role])
        assert client.get("/api-clients/").status_code == 403
        assert client.post("/api-clients/", {"name": "y", "role": "auditor"}).status_code == 403
        assert client.post(f"/api-clients/{existing.pk}/revoke/").status_code == 403
        assert ApiClient.objects.filter(revoked_at=None).count() == 1
