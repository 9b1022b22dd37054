"""The Alerts page through the automation API, over real HTTP to gunicorn: channels and rules as
configuration validated by their site-YAML sections (the webhook URL write-only), the conditions
active now and the alerts sent (from a real evaluation, mailed to aiosmtpd), and Send test alert
to a real SMTP server (aiosmtpd, which gunicorn is pointed at) and a real webhook receiver."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import yaml
from aiosmtpd.controller import Controller

from pacslens.ops.alerts.service import alerts_check
from pacslens.site_config.document import ConfigError, config_import
from results.models import AlertChannel, AlertRule
from routing.models import AuditEntry
from tests.support.alert_receivers import SMTPRecorder
from tests.support.factories import make_destination, make_failed_delivery, make_result, make_study
from tests.support.net import free_port

PROBLEM = "application/problem+json"
ADMIN = "pacs_administrator"
PATIENT = "ZZTEST^UI"


@pytest.fixture(scope="module", autouse=True)
def gunicorn_smtp() -> Iterator[SMTPRecorder]:
    """An SMTP server for the module's gunicorn (autouse module fixtures start before it), set
    through the environment it reads at start."""
    recorder = SMTPRecorder()
    port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    controller.start()
    saved = {k: os.environ.get(k) for k in ("PACSLENS_EMAIL_HOST", "PACSLENS_EMAIL_PORT")}
    os.environ.update(PACSLENS_EMAIL_HOST="127.0.0.1", PACSLENS_EMAIL_PORT=str(port))
    try:
        yield recorder
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        controller.stop()


def problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == PROBLEM
    return response.json()


def yaml_problems(section: str, entry: dict) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        config_import(yaml.safe_dump({"pacslens_config": 1, section: [entry]}), dry_run=True)
    return refused.value.problems


class TestChannels:
    def test_crud_validated_as_the_yaml_section_with_the_webhook_url_write_only(self, api, webhook_receiver):
        bad = {"name": "teams", "kind": "webhook", "webhook_format": "teams", "webhook_url": "ftp://x"}
        body = problem(api.call(ADMIN, "POST", "/config/alert-channels", json=bad), 422)
        assert body["field"] == "webhook_url"
        assert body["errors"][0]["detail"] in " ".join(yaml_problems("alert_channels", bad))

        good = {**bad, "webhook_url": webhook_receiver.url}
        created = api.call(ADMIN, "POST", "/config/alert-channels", json=good)
        assert created.status_code == 201, created.text
        entry = created.json()["entry"]
        assert entry["name"] == "teams" and "webhook_url" not in entry
        assert webhook_receiver.url not in created.text
        channel = AlertChannel.objects.get(name="teams")
        assert channel.webhook_url == webhook_receiver.url
        audit = AuditEntry.objects.get(action="create", object_type="results.alertchannel")
        assert audit.after["webhook_url"] == "********" and audit.actor == "api:test-pacs_administrator"

        path = f"/config/alert-channels/{channel.pk}"
        etag = api.call(ADMIN, "GET", path).headers["ETag"]
        patched = api.call(ADMIN, "PATCH", path, json={"enabled": False}, headers={"If-Match": etag})
        assert patched.status_code == 200, patched.text
        channel.refresh_from_db()
        assert not channel.enabled and channel.webhook_url == webhook_receiver.url, "the URL is kept"
        problem(api.call(ADMIN, "DELETE", path, headers={"If-Match": etag}), 412)
        assert api.call(ADMIN, "DELETE", path, headers={"If-Match": patched.headers["ETag"]}).status_code == 204
        assert not AlertChannel.objects.filter(name="teams").exists()

    def test_send_test_alert_by_email_and_to_a_failing_webhook(self, api, gunicorn_smtp, webhook_receiver):
        mail = AlertChannel.objects.create(name="it-team", kind="email", email_to="it@hospital.example")
        response = api.call(ADMIN, "POST", f"/config/alert-channels/{mail.pk}/test")
        assert response.status_code == 200, response.text
        assert response.json() == {"channel": "it-team", "sent": True, "error": ""}
        rcpt, message = gunicorn_smtp.messages[-1]
        assert rcpt == ["it@hospital.example"] and "from the automation API" in message.get_payload()

        hook = AlertChannel.objects.create(name="hook", kind="webhook", webhook_url=webhook_receiver.url)
        webhook_receiver.script = [500]
        body = api.call(ADMIN, "POST", f"/config/alert-channels/{hook.pk}/test").json()
        assert body == {"channel": "hook", "sent": False, "error": "the webhook answered HTTP 500"}
        hook.refresh_from_db()
        assert hook.last_error == "the webhook answered HTTP 500"
        assert [e.detail for e in AuditEntry.objects.filter(action="test").order_by("at", "id")] == [
            "test alert sent",
            "failed: the webhook answered HTTP 500",
        ]

        AlertChannel.objects.filter(pk=mail.pk).update(email_to="")
        body = problem(api.call(ADMIN, "POST", f"/config/alert-channels/{mail.pk}/test"), 409)
        assert body["detail"].startswith("Fix the channel first:")
        problem(api.call("informaticist", "POST", f"/config/alert-channels/{mail.pk}/test"), 403)


class TestRules:
    def test_a_rule_is_validated_as_the_yaml_section(self, api):
        bad = {"name": "ct1-silent", "condition": "sender_silent", "hours": 4}
        body = problem(api.call(ADMIN, "POST", "/config/alert-rules", json=bad), 422)
        assert body["errors"][0]["detail"] in " ".join(yaml_problems("alert_rules", bad))
        good = {**bad, "ae_title": "CT1", "weekdays": "mon,tue", "active_from": "07:00", "active_to": "19:00"}
        created = api.call(ADMIN, "POST", "/config/alert-rules", json=good)
        assert created.status_code == 201, created.text
        assert created.json()["entry"]["active_from"] == "07:00"
        assert AlertRule.objects.get(name="ct1-silent").ae_title == "CT1"
        assert api.call("auditor", "GET", "/config/alert-rules").status_code == 403


class TestStatus:
    def test_active_conditions_and_recent_alerts_of_a_real_evaluation(self, api, smtp_server):
        AlertRule.objects.all().delete()  # the migration's default rules would fire too
        AlertRule.objects.create(name="failure-queue", condition="failure_queue")
        AlertChannel.objects.create(name="it-team", kind="email", email_to="it@hospital.example")
        study = make_study(patient_name=PATIENT)
        make_failed_delivery(study, make_result(study), make_destination("ris"))
        assert alerts_check() == {"changed": 1, "sent": 1}

        active = api.call(ADMIN, "GET", "/alerts/active")
        assert active.status_code == 200, active.text
        [state] = active.json()
        assert (state["rule"], state["condition"], state["subject"]) == ("failure-queue", "failure_queue", "ris")
        events = api.call(ADMIN, "GET", "/alerts/events").json()
        assert [(e["kind"], e["rule"]) for e in events] == [("started", "failure-queue")]
        assert events[0]["notifications"] == [{"channel": "it-team", "state": "sent", "last_error": ""}]
        assert PATIENT not in active.text + str(events)
        problem(api.call(ADMIN, "GET", "/alerts/events", params={"limit": 0}), 422)
        problem(api.call("informaticist", "GET", "/alerts/active"), 403)
