"""The Webhooks page: a PACS administrator adds a subscription and sees its signing secret once,
the URL never comes back, a bad URL is refused next to its field, failed events are listed."""

from __future__ import annotations

import pytest
from django.test import Client

from results.deliver.webhooks import webhook_events_record
from results.models import WebhookSubscription
from routing.models import AuditEntry
from tests.support.factories import make_result, make_study

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("plain_static_storage")]
URL = "https://engine.example.org/hook?token=url-credential"


@pytest.fixture
def admin_client(client: Client, users) -> Client:
    client.force_login(users["admin"])
    return client


class TestWebhookPage:
    def test_add_shows_the_secret_once_and_never_the_url(self, admin_client):
        response = admin_client.post(
            "/webhooks/new/",
            {
                "name": "mirth",
                "webhook_url": URL,
                "event_types": ["result.flagged", "delivery.failed"],
                "enabled": "on",
            },
        )
        assert response.status_code == 200
        subscription = WebhookSubscription.objects.get()
        assert subscription.webhook_url == URL and subscription.event_types == ["delivery.failed", "result.flagged"]
        assert subscription.secret.startswith("whsec_") and subscription.secret in response.content.decode()
        assert response["Cache-Control"].startswith("max-age=0")
        page = admin_client.get("/webhooks/").content.decode()
        assert "mirth" in page and subscription.secret not in page and "url-credential" not in page
        edit = admin_client.get(f"/webhooks/{subscription.pk}/").content.decode()
        assert "url-credential" not in edit and subscription.secret not in edit
        assert AuditEntry.objects.filter(action="create", object_repr="webhook mirth").exists()
        assert "url-credential" not in str(list(AuditEntry.objects.values("before", "after")))

    def test_edit_keeps_the_url_and_secret_unless_told(self, admin_client):
        subscription = WebhookSubscription.objects.create(name="mirth", webhook_url=URL, secret="s" * 20)
        response = admin_client.post(
            f"/webhooks/{subscription.pk}/", {"name": "mirth", "webhook_url": "", "event_types": ["study.delivered"]}
        )
        assert response.status_code == 302
        subscription.refresh_from_db()
        assert (subscription.webhook_url, subscription.secret, subscription.enabled) == (URL, "s" * 20, False)
        rotated = admin_client.post(
            f"/webhooks/{subscription.pk}/",
            {"name": "mirth", "event_types": ["study.delivered"], "rotate_secret": "on", "enabled": "on"},
        )
        subscription.refresh_from_db()
        assert subscription.secret != "s" * 20 and subscription.secret in rotated.content.decode()

    def test_a_bad_url_is_refused_next_to_its_field(self, admin_client):
        response = admin_client.post(
            "/webhooks/new/", {"name": "x", "webhook_url": "file:///etc/passwd", "event_types": ["result.flagged"]}
        )
        assert response.status_code == 200
        assert "starting with https://" in response.content.decode() and not WebhookSubscription.objects.exists()

    def test_failed_events_are_listed(self, admin_client):
        WebhookSubscription.objects.create(name="mirth", webhook_url=URL, secret="s" * 20)
        study = make_study(accession="ZZACC9")
        [event] = webhook_events_record(event_type="result.flagged", study=study, result=make_result(study))
        event.state, event.last_error = "failed", "the receiver answered HTTP 500"
        event.save()
        fragment = admin_client.get("/webhooks/", headers={"HX-Request": "true"}).content.decode()
        assert "<html" not in fragment and str(event.event_id) in fragment
        assert "the receiver answered HTTP 500" in fragment and "ZZACC9" not in fragment
