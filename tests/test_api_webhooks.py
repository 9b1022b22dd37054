"""Webhook subscriptions through the automation API over real HTTP (gunicorn): create with the
secret answered once, write-only URL, ETags on writes, validation as problem+json, the audit,
and the events a subscription was sent."""

from __future__ import annotations

import json

from django.utils import timezone

from results.deliver.webhooks import webhook_events_record
from results.models import WebhookSubscription
from routing.models import AuditEntry
from tests.support.factories import make_result, make_study

PROBLEM = "application/problem+json"
URL = "https://engine.example.org/hooks/pacslens?token=url-credential"


def problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == PROBLEM
    return response.json()


class TestWebhookApi:
    def test_lifecycle_with_the_secret_once_and_etags(self, api):
        created = api.call("pacs_administrator", "POST", "/webhooks", json={"name": "mirth", "url": URL})
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["secret"].startswith("whsec_") and len(body["secret"]) > 40
        assert body["events"] == ["study.delivered", "delivery.failed", "result.flagged"]
        assert body["url_set"] is True and "url-credential" not in created.text
        assert created.headers["ETag"] == body["etag"] and created.headers["Location"].endswith(
            f"/webhooks/{body['id']}"
        )
        stored = WebhookSubscription.objects.get(name="mirth")
        assert (stored.webhook_url, stored.secret) == (URL, body["secret"])
        item = f"/webhooks/{body['id']}"

        read = api.call("auditor", "GET", item)
        assert read.status_code == 200 and read.json()["secret"] is None and body["secret"] not in read.text
        assert "url-credential" not in api.call("auditor", "GET", "/webhooks").text

        problem(api.call("pacs_administrator", "PATCH", item, json={"enabled": False}), 428)
        problem(
            api.call("pacs_administrator", "PATCH", item, json={"enabled": False}, headers={"If-Match": '"x"'}), 412
        )
        changed = api.call(
            "pacs_administrator",
            "PATCH",
            item,
            json={"enabled": False, "events": ["result.flagged"]},
            headers={"If-Match": body["etag"]},
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["etag"] != body["etag"] and changed.json()["secret"] is None
        stored.refresh_from_db()
        assert (stored.enabled, stored.event_types, stored.secret) == (False, ["result.flagged"], body["secret"])
        # The first editor's tag is stale now.
        problem(
            api.call("pacs_administrator", "PATCH", item, json={"enabled": True}, headers={"If-Match": body["etag"]}),
            412,
        )

        rotated = api.call(
            "pacs_administrator",
            "PATCH",
            item,
            json={"rotate_secret": True},
            headers={"If-Match": changed.json()["etag"]},
        )
        assert rotated.status_code == 200, rotated.text
        new_secret = rotated.json()["secret"]
        assert new_secret and new_secret != body["secret"]
        assert WebhookSubscription.objects.get(pk=stored.pk).secret == new_secret

        gone = api.call("pacs_administrator", "DELETE", item, headers={"If-Match": rotated.json()["etag"]})
        assert gone.status_code == 204 and not WebhookSubscription.objects.exists()
        audit = list(
            AuditEntry.objects.filter(actor="api:test-pacs_administrator")
            .order_by("pk")
            .values("action", "before", "after")
        )
        assert [a["action"] for a in audit] == ["create", "update", "update", "delete"]
        text = json.dumps(audit)
        assert "url-credential" not in text and body["secret"] not in text and new_secret not in text

    def test_bad_input_is_a_problem_naming_the_field(self, api):
        bad_url = problem(
            api.call("pacs_administrator", "POST", "/webhooks", json={"name": "x", "url": "ftp://h/x"}), 422
        )
        assert bad_url["field"] == "url" and "https://" in bad_url["detail"]
        bad_event = problem(
            api.call(
                "pacs_administrator",
                "POST",
                "/webhooks",
                json={"name": "x", "url": URL, "events": ["study.exploded"]},
            ),
            422,
        )
        assert bad_event["field"] == "events" and "study.exploded" in bad_event["detail"]
        short = problem(
            api.call("pacs_administrator", "POST", "/webhooks", json={"name": "x", "url": URL, "secret": "short"}), 422
        )
        assert short["field"] == "secret"
        missing = problem(api.call("pacs_administrator", "POST", "/webhooks", json={"name": "x"}), 422)
        assert missing["field"] == "url"
        assert not WebhookSubscription.objects.exists()
        assert api.call("pacs_administrator", "POST", "/webhooks", json={"name": "x", "url": URL}).status_code == 201
        clash = problem(api.call("pacs_administrator", "POST", "/webhooks", json={"name": "x", "url": URL}), 409)
        assert clash["field"] == "name"

    def test_the_events_a_subscription_was_sent(self, api):
        subscription = WebhookSubscription.objects.create(name="engine", webhook_url=URL, secret="s" * 20)
        study = make_study(accession="ZZACC77")
        result = make_result(study)
        [event] = webhook_events_record(event_type="result.flagged", study=study, result=result)
        event.state, event.attempts, event.last_error = "failed", 8, "the receiver answered HTTP 500"
        event.sent_at = None
        event.next_attempt_at = timezone.now()
        event.save()
        rows = api.call("auditor", "GET", f"/webhooks/{subscription.pk}/events", params={"state": "failed"}).json()
        assert rows == [
            {
                "event_id": str(event.event_id),
                "type": "result.flagged",
                "state": "failed",
                "attempts": 8,
                "created_at": rows[0]["created_at"],
                "next_attempt_at": rows[0]["next_attempt_at"],
                "sent_at": None,
                "last_error": "the receiver answered HTTP 500",
            }
        ]
        assert api.call("auditor", "GET", f"/webhooks/{subscription.pk}/events", params={"state": "sent"}).json() == []
        problem(api.call("auditor", "GET", f"/webhooks/{subscription.pk}/events", params={"state": "lost"}), 422)
