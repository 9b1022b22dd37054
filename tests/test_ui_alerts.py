"""The Alerts page: PACS administrators configure channels and rules (validated inline, audited,
the webhook URL write-only and masked in the audit log) and send a test alert to a real SMTP
server and a real HTTP receiver."""

from __future__ import annotations

import pytest

from results.models import AlertChannel, AlertRule, AlertState
from routing.models import AuditEntry

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("plain_static_storage")]
HX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def admin(client, users):
    client.force_login(users["admin"])
    return client


class TestAlertPage:
    def test_it_lists_channels_rules_and_active_conditions(self, admin):
        AlertChannel.objects.create(name="it-team", kind="email", email_to="it@hospital.example")
        rule = AlertRule.objects.get(name="failure-queue")  # made by the migration
        AlertState.objects.create(rule=rule, subject="ris", active=True, message="2 deliveries to ris failed")
        page = admin.get("/alerts/").content.decode()
        assert 'id="channel-' in page and "it@hospital.example" in page and "Send test alert" in page
        assert "model-failure-rate" in page and "above 20 % failed" in page
        assert "2 deliveries to ris failed" in page
        fragment = admin.get("/alerts/", **HX).content.decode()
        assert "<html" not in fragment and 'id="alert-status"' in fragment

    def test_only_pacs_administrators(self, client, users):
        for role, status in (("informaticist", 403), ("nobody", 403), ("superuser", 200), ("admin", 200)):
            client.force_login(users[role])
            assert client.get("/alerts/").status_code == status, role
            assert client.get("/alerts/channels/new/").status_code == status, role

    def test_channel_form_validates_inline(self, admin):
        page = admin.post("/alerts/channels/new/", {"name": "x", "kind": "email", "email_to": "nobody"}, **HX)
        text = page.content.decode()
        assert "&#x27;nobody&#x27; is not an e-mail address" in text and not AlertChannel.objects.exists()
        text = admin.post("/alerts/channels/new/", {"name": "x", "kind": "webhook"}, **HX).content.decode()
        assert "Enter the webhook URL" in text

    def test_webhook_url_is_write_only_and_masked_in_the_audit(self, admin, webhook_receiver):
        values = {"name": "teams", "kind": "webhook", "webhook_format": "teams", "enabled": "on"}
        response = admin.post("/alerts/channels/new/", {**values, "webhook_url": webhook_receiver.url}, **HX)
        assert response["HX-Redirect"] == "/alerts/"
        channel = AlertChannel.objects.get()
        assert channel.webhook_url == webhook_receiver.url
        assert AuditEntry.objects.get(action="create").after["webhook_url"] == "********"
        form = admin.get(f"/alerts/channels/{channel.pk}/").content.decode()
        assert "secret-part" not in form and "(unchanged)" in form
        admin.post(f"/alerts/channels/{channel.pk}/", {**values, "webhook_format": "slack"}, **HX)
        channel.refresh_from_db()
        assert (channel.webhook_format, channel.webhook_url) == ("slack", webhook_receiver.url)
        assert "secret-part" not in str(AuditEntry.objects.get(action="update").after)

    def test_rule_form_checks_the_condition_parameters(self, admin):
        text = admin.post("/alerts/rules/new/", {"name": "ct", "condition": "sender_silent"}, **HX).content.decode()
        assert "Name the sender&#x27;s calling AE title." in text
        response = admin.post(
            "/alerts/rules/new/",
            {
                "name": "ct1-silent",
                "condition": "sender_silent",
                "enabled": "on",
                "ae_title": "CT1",
                "hours": "4",
                "weekdays": "mon,tue,wed,thu,fri",
                "active_from": "07:00",
                "active_to": "19:00",
                "window_hours": "24",
                "min_results": "10",
            },
            **HX,
        )
        assert response["HX-Redirect"] == "/alerts/"
        assert "CT1: 4 h silent on mon,tue,wed,thu,fri, 07:00–19:00" in admin.get("/alerts/").content.decode()

    def test_send_test_alert_by_email_and_webhook(self, admin, smtp_server, webhook_receiver):
        mail = AlertChannel.objects.create(name="it-team", kind="email", email_to="it@hospital.example")
        page = admin.post(f"/alerts/channels/{mail.pk}/test/", **HX).content.decode()
        assert "test alert sent to it-team" in page
        assert smtp_server.messages[0][0] == ["it@hospital.example"]
        hook = AlertChannel.objects.create(name="hook", kind="webhook", webhook_url=webhook_receiver.url)
        webhook_receiver.script = [500]
        page = admin.post(f"/alerts/channels/{hook.pk}/test/", **HX).content.decode()
        assert "failed" in page and "the webhook answered HTTP 500" in page
        assert AuditEntry.objects.filter(action="test").count() == 2
