"""The failure queue as a daily tool: Retry all per destination always at hand, every action
confirmed with a message, retried rows kept in view, dashboard counts that lead to the queue,
read-only access for PACS administrators; re-deliver asks first; a bad triage filter shows nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from results.models import Delivery, DeliveryState, Destination
from routing.models import AuditEntry
from tests.support.factories import make_destination, make_failed_delivery, make_result, make_study

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("plain_static_storage")]
HX = {"HTTP_HX_REQUEST": "true"}


def login(client, users, role):
    client.force_login(users[role])
    return client


class TestRetryAll:
    def test_each_destination_has_its_retry_all_without_choosing_it_first(self, client, users, pipeline):
        pacs = make_destination(name="pacs", port=104)
        other = make_study(accession="ACC300", state="failed")
        make_failed_delivery(other, make_result(other), pacs)
        page = login(client, users, "informaticist").get("/failures/").content.decode()
        assert "Retry all 1 failed for ris" in page and "Retry all 1 failed for pacs" in page
        response = client.post("/failures/retry/", {"destination_all": pacs.pk}, **HX)
        page = response.content.decode()
        assert 'id="queue-message"' in page and "1 delivery to pacs queued again" in page
        assert Delivery.objects.get(destination=pacs).state == DeliveryState.PENDING
        assert Delivery.objects.get(pk=pipeline["delivery"].pk).state == DeliveryState.FAILED

    def test_a_retry_closes_an_open_breaker_and_the_timeline_says_so(self, client, users, pipeline):
        destination = pipeline["destination"]
        Destination.objects.filter(pk=destination.pk).update(circuit_open_until=timezone.now() + timedelta(minutes=5))
        login(client, users, "informaticist").post("/failures/retry/", {"destination_all": destination.pk}, **HX)
        destination.refresh_from_db()
        assert destination.circuit_open_until is None
        event = pipeline["failed"].events.get(kind="circuit_closed")
        assert event.detail == "ris: circuit closed by the retry informaticist requested"

    def test_without_htmx_the_message_comes_after_the_redirect(self, client, users, pipeline):
        login(client, users, "informaticist")
        response = client.post("/failures/retry/", {"delivery": pipeline["delivery"].pk}, follow=True)
        assert "1 delivery queued again; they stay listed until they settle." in response.content.decode()


class TestMessagesAndWatchedRows:
    def test_a_discard_is_confirmed(self, client, users, pipeline):
        delivery = pipeline["delivery"]
        login(client, users, "informaticist")
        page = client.post(f"/failures/{delivery.pk}/discard/", {"reason": "Order cancelled"}, **HX).content.decode()
        assert f"Delivery #{delivery.pk} to ris discarded." in page
        assert f'id="delivery-{delivery.pk}"' not in page  # settled by staff: it leaves the queue

    def test_retried_rows_stay_whatever_the_filter_until_cleared(self, client, users, pipeline):
        delivery = pipeline["delivery"]
        login(client, users, "informaticist")
        client.post("/failures/retry/", {"delivery": delivery.pk, "error_class": "permanent"}, **HX)
        # The filter now selects nothing this row matches (it is pending, its error class cleared) ...
        page = client.get("/failures/", {"error_class": "transient", "watch": delivery.pk}, **HX).content.decode()
        assert f'id="delivery-{delivery.pk}" data-state="pending"' in page and "every 2s" in page
        # ... and changing the filter keeps the watch list (htmx sends it along with the filters).
        full = client.get("/failures/").content.decode()
        assert 'hx-include="#queue-state [name=watch]"' in full


class TestDashboardLinks:
    def test_pending_and_failed_counts_open_the_filtered_queue(self, client, users, pipeline):
        destination = pipeline["destination"]
        study = make_study(accession="ACC400", state="delivering")
        waiting = make_failed_delivery(study, make_result(study), destination)
        Delivery.objects.filter(pk=waiting.pk).update(state="pending", next_attempt_at=timezone.now())
        login(client, users, "informaticist")
        page = client.get("/", **HX).content.decode()
        assert f'href="/failures/?view=waiting&amp;destination={destination.pk}">1</a>' in page
        assert f'href="/failures/?destination={destination.pk}"' in page
        queue = client.get("/failures/", {"view": "waiting", "destination": destination.pk}, **HX).content.decode()
        assert f'id="delivery-{waiting.pk}" data-state="pending"' in queue
        assert f'id="delivery-{pipeline["delivery"].pk}"' not in queue


class TestReadOnlyForPacsAdministrators:
    def test_they_see_what_failed_without_the_buttons(self, client, users, pipeline):
        page = login(client, users, "admin").get("/failures/").content.decode()
        assert f'id="delivery-{pipeline["delivery"].pk}"' in page and "RIS answered AE" in page
        assert "Read-only" in page
        assert "Retry all" not in page and ">Retry<" not in page and "Discard…" not in page
        assert 'name="selected"' not in page

    def test_their_actions_are_still_refused(self, client, users, pipeline):
        login(client, users, "admin")
        assert client.post("/failures/retry/", {"destination_all": pipeline["destination"].pk}).status_code == 403
        assert client.get(f"/failures/{pipeline['delivery'].pk}/discard/").status_code == 403
        assert Delivery.objects.get(pk=pipeline["delivery"].pk).state == DeliveryState.FAILED


class TestRedeliverAsks:
    def test_an_already_delivered_study_is_sent_again_only_once_confirmed(self, client, users, pipeline):
        study = make_study(accession="ACC500")
        delivered = make_failed_delivery(study, make_result(study), pipeline["destination"])
        Delivery.objects.filter(pk=delivered.pk).update(state="delivered", delivered_at=timezone.now())
        login(client, users, "informaticist")
        page = client.post(f"/studies/{study.pk}/redeliver/", **HX).content.decode()
        assert "was already delivered to ris" in page and 'name="confirm" value="yes"' in page
        assert Delivery.objects.get(pk=delivered.pk).state == DeliveryState.DELIVERED
        assert not AuditEntry.objects.filter(action="retry").exists()
        page = client.post(f"/studies/{study.pk}/redeliver/", {"confirm": "yes"}, **HX).content.decode()
        assert "1 delivery queued again" in page
        assert Delivery.objects.get(pk=delivered.pk).state == DeliveryState.PENDING

    def test_without_javascript_the_question_is_a_page(self, client, users, pipeline):
        study = make_study(accession="ACC501")
        delivered = make_failed_delivery(study, make_result(study), pipeline["destination"])
        Delivery.objects.filter(pk=delivered.pk).update(state="delivered")
        page = login(client, users, "informaticist").post(f"/studies/{study.pk}/redeliver/").content.decode()
        assert page.startswith("<!DOCTYPE html>") and "Send again" in page


class TestTriageFilterErrors:
    @pytest.mark.parametrize(
        ("query", "words"),
        [
            ({"score_min": "0.9", "score_max": "0.1"}, "Maximum score: The maximum score is below the minimum."),
            ({"date_from": "2026-13-45"}, "From date: Enter a date as YYYY-MM-DD."),
            ({"date_from": "2026-11-02", "date_to": "2026-11-01"}, "To date: The end date is before the start date."),
        ],
    )
    def test_a_bad_filter_is_named_in_words_and_lists_nothing(self, client, users, pipeline, query, words):
        login(client, users, "superuser")
        page = client.get("/audit/triage/", query, **HX).content.decode()
        assert words in page and "nothing is listed or exported until it is" in page
        assert "score_max:" not in page and "date_from:" not in page
        assert "ACC100" not in page and "ACC200" not in page and 'id="csv-export"' not in page
        export = client.get("/audit/triage.csv", query)
        assert export.status_code == 400 and words in export.content.decode()
        assert "ACC100" not in export.content.decode()
        assert not AuditEntry.objects.filter(action="export_audit").exists()

    def test_a_valid_filter_still_lists_and_exports(self, client, users, pipeline):
        login(client, users, "superuser")
        page = client.get("/audit/triage/", {"score_min": "0.1", "score_max": "0.95"}, **HX).content.decode()
        assert "ACC100" in page and 'id="csv-export"' in page
        assert "ACC100" in b"".join(client.get("/audit/triage.csv", {"score_min": "0.1"}).streaming_content).decode()
