"""Who may open what: the permissions matrix (each role against each URL), login, lockout, CSRF."""

from __future__ import annotations

import ipaddress

import pytest
from django.test import Client

from routing.models import AuditEntry
from tests.support.factories import PASSWORD

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("plain_static_storage")]

STAFF = {"admin", "informaticist", "superuser"}
ADMIN = {"admin", "superuser"}
INFORMATICIST = {"informaticist", "superuser"}
SUPERUSER = {"superuser"}


def get_urls(p: dict) -> list[tuple[str, set[str]]]:
    return [
        ("/", STAFF),
        ("/studies/", STAFF),
        (f"/studies/{p['done'].pk}/", STAFF),
        ("/failures/", STAFF),  # PACS administrators read it: they fix the endpoint
        (f"/failures/{p['delivery'].pk}/discard/", INFORMATICIST),
        ("/endpoints/", ADMIN),
        ("/endpoints/ae/new/", ADMIN),
        ("/endpoints/destinations/new/", ADMIN),
        (f"/endpoints/destinations/{p['destination'].pk}/", ADMIN),
        ("/endpoints/poll-sources/new/", ADMIN),
        (f"/endpoints/ae/{p['entity'].pk}/assess/", ADMIN),
        (f"/endpoints/ae/{p['entity'].pk}/delete/", ADMIN),
        (f"/endpoints/destinations/{p['destination'].pk}/delete/", ADMIN),
        (f"/rules/{p['rule'].pk}/delete/", ADMIN),
        ("/rules/", ADMIN),
        ("/rules/new/", ADMIN),
        (f"/rules/{p['rule'].pk}/", ADMIN),
        ("/rules/dry-run/", ADMIN),
        ("/models/", ADMIN),
        ("/webhooks/", ADMIN),
        ("/webhooks/new/", ADMIN),
        ("/audit/triage/", SUPERUSER),
        ("/audit/triage.csv", SUPERUSER),
        ("/audit/log/", SUPERUSER),
    ]


def post_urls(p: dict) -> list[tuple[str, dict, set[str]]]:
    return [
        ("/failures/retry/", {"delivery": p["delivery"].pk}, INFORMATICIST),
        (f"/failures/{p['delivery'].pk}/discard/", {"reason": ""}, INFORMATICIST),
        (f"/studies/{p['done'].pk}/rerun/", {}, INFORMATICIST),
        (f"/studies/{p['done'].pk}/redeliver/", {}, INFORMATICIST),
        (f"/rules/{p['rule'].pk}/toggle/", {}, ADMIN),
        (f"/rules/{p['rule'].pk}/move/", {"direction": "up"}, ADMIN),
        (f"/endpoints/destinations/{p['destination'].pk}/toggle/", {}, ADMIN),
        ("/endpoints/ae/new/", {"ae_title": ""}, ADMIN),
        (f"/endpoints/ae/{p['entity'].pk}/assess/", {}, ADMIN),
        ("/webhooks/new/", {"name": ""}, ADMIN),
    ]


class TestPermissionsMatrix:
    @pytest.mark.parametrize("role", ["admin", "informaticist", "superuser", "nobody"])
    def test_every_page_and_fragment_checks_the_role(self, client, users, pipeline, role):
        client.force_login(users[role])
        for url, allowed in get_urls(pipeline):
            for headers in ({}, {"HTTP_HX_REQUEST": "true"}):
                response = client.get(url, **headers)
                expected = 200 if role in allowed else 403
                assert response.status_code == expected, (role, url, headers, response.status_code)

    @pytest.mark.parametrize("role", ["admin", "informaticist", "nobody"])
    def test_every_action_checks_the_role(self, client, users, pipeline, role):
        client.force_login(users[role])
        for url, data, allowed in post_urls(pipeline):
            response = client.post(url, data, HTTP_HX_REQUEST="true")
            if role in allowed:
                assert response.status_code == 200, (role, url, response.status_code)
            else:
                assert response.status_code == 403, (role, url, response.status_code)

    def test_a_forbidden_action_changes_nothing(self, client, users, pipeline):
        client.force_login(users["admin"])
        assert client.post("/failures/retry/", {"delivery": pipeline["delivery"].pk}).status_code == 403
        pipeline["delivery"].refresh_from_db()
        assert pipeline["delivery"].state == "failed"


class TestAnonymous:
    def test_pages_redirect_to_the_login_page(self, client, pipeline):
        for url, _ in get_urls(pipeline):
            response = client.get(url)
            assert response.status_code == 302, url
            assert response["Location"].startswith("/login/?next="), url

    def test_fragments_ask_htmx_to_redirect(self, client, pipeline):
        response = client.get("/studies/", HTTP_HX_REQUEST="true")
        assert response["HX-Redirect"].startswith("/login/")

    def test_actions_do_nothing(self, client, pipeline):
        response = client.post("/failures/retry/", {"delivery": pipeline["delivery"].pk})
        assert response.status_code == 302
        pipeline["delivery"].refresh_from_db()
        assert pipeline["delivery"].state == "failed"


class TestLogin:
    def test_it_logs_in_and_audits_it(self, client, users):
        response = client.post("/login/", {"username": "informaticist", "password": PASSWORD})
        assert response.status_code == 302 and response["Location"] == "/"
        assert AuditEntry.objects.filter(actor="informaticist", action="login").exists()

    def test_failed_logins_are_audited_then_locked_out(self, client, users, settings):
        settings.AXES_FAILURE_LIMIT = 3
        for _ in range(3):
            client.post("/login/", {"username": "informaticist", "password": "wrong"})
        assert AuditEntry.objects.filter(actor="informaticist", action="login_failed").count() >= 2
        # Locked out now: even the right password is refused.
        response = client.post("/login/", {"username": "informaticist", "password": PASSWORD})
        assert response.status_code == 429
        assert b"Too many failed logins" in response.content
        assert "_auth_user_id" not in client.session

    def test_behind_a_trusted_proxy_the_lockout_is_per_user_and_client_address(self, client, users, settings):
        settings.AXES_FAILURE_LIMIT = 3
        settings.TRUSTED_PROXIES = [ipaddress.ip_network("10.0.0.1")]
        via_proxy = {"REMOTE_ADDR": "10.0.0.1"}
        for _ in range(3):
            client.post(
                "/login/",
                {"username": "informaticist", "password": "wrong"},
                HTTP_X_FORWARDED_FOR="203.0.113.5",
                **via_proxy,
            )
        right = {"username": "informaticist", "password": PASSWORD}
        assert client.post("/login/", right, HTTP_X_FORWARDED_FOR="203.0.113.5", **via_proxy).status_code == 429
        # The same user from another workstation, through the same proxy, is not locked out.
        assert client.post("/login/", right, HTTP_X_FORWARDED_FOR="203.0.113.6", **via_proxy).status_code == 302

    def test_the_audit_log_records_the_client_behind_a_trusted_proxy(self, client, users, settings):
        settings.TRUSTED_PROXIES = [ipaddress.ip_network("10.0.0.1")]
        client.post(
            "/login/",
            {"username": "informaticist", "password": "wrong"},
            REMOTE_ADDR="10.0.0.1",
            HTTP_X_FORWARDED_FOR="203.0.113.5",
        )
        entry = AuditEntry.objects.get(actor="informaticist", action="login_failed")
        assert entry.remote_addr == "203.0.113.5"

    def test_a_forwarded_for_header_from_an_untrusted_peer_is_ignored(self, client, users, settings):
        settings.AXES_FAILURE_LIMIT = 3
        settings.TRUSTED_PROXIES = [ipaddress.ip_network("10.0.0.1")]
        for n in range(3):
            client.post(
                "/login/",
                {"username": "informaticist", "password": "wrong"},
                REMOTE_ADDR="198.51.100.7",
                HTTP_X_FORWARDED_FOR=f"203.0.113.{n}",
            )
        response = client.post(
            "/login/",
            {"username": "informaticist", "password": PASSWORD},
            REMOTE_ADDR="198.51.100.7",
            HTTP_X_FORWARDED_FOR="203.0.113.99",
        )
        assert response.status_code == 429

    def test_logout_is_a_post_and_audited(self, client, users):
        client.force_login(users["admin"])
        assert client.post("/logout/").status_code == 302
        assert AuditEntry.objects.filter(actor="admin", action="logout").exists()


class TestCSRF:
    def test_posts_without_the_token_are_refused(self, users, pipeline):
        client = Client(enforce_csrf_checks=True)
        client.force_login(users["superuser"])
        response = client.post("/failures/retry/", {"delivery": pipeline["delivery"].pk}, HTTP_HX_REQUEST="true")
        assert response.status_code == 403
        pipeline["delivery"].refresh_from_db()
        assert pipeline["delivery"].state == "failed"

    def test_pages_send_the_token_in_hx_headers(self, users, pipeline):
        client = Client(enforce_csrf_checks=True)
        client.force_login(users["superuser"])
        page = client.get("/failures/").content.decode()
        token = client.cookies["csrftoken"].value
        assert 'hx-headers=\'{"X-CSRFToken": "' in page
        response = client.post(
            "/failures/retry/", {"delivery": pipeline["delivery"].pk}, HTTP_HX_REQUEST="true", HTTP_X_CSRFTOKEN=token
        )
        assert response.status_code == 200

    def test_no_staff_view_is_csrf_exempt(self):
        from django.urls import get_resolver

        def walk(patterns):
            for p in patterns:
                if hasattr(p, "url_patterns"):
                    yield from walk(p.url_patterns)
                else:
                    yield p

        for pattern in walk(get_resolver().url_patterns):
            module = getattr(pattern.callback, "__module__", "")
            if module.startswith(("pacslens.staff.views", "pacslens.staff.views")):
                assert not getattr(pattern.callback, "csrf_exempt", False), pattern
