"""The UI tells the truth about states: a discarded delivery is not a delivered one, a study with
nothing to deliver is settled, a destination's last Test and its circuit breaker show in Health."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from pacslens.ops.study_status import study_status_data
from results.deliver.ledger import delivery_discard
from results.models import Delivery, Destination
from routing.models import Study
from tests.support.factories import make_result, make_study
from tests.support.net import free_port

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("plain_static_storage")]
HX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def informaticist(client, users):
    client.force_login(users["informaticist"])
    return client


class TestDiscardedIsNotDelivered:
    def test_the_study_is_closed_everywhere(self, informaticist, pipeline):
        study = pipeline["failed"]
        delivery_discard(delivery=pipeline["delivery"], actor="informaticist", reason="RIS order cancelled")
        study.refresh_from_db()
        assert study.state == "closed"
        assert study_status_data(study)["state"] == "closed"
        page = informaticist.get(f"/studies/{study.pk}/").content.decode()
        assert '<span class="status idle">Closed (discarded)</span>' in page
        assert "closed without full delivery: 0 of 1 delivered, 1 discarded" in page
        listing = informaticist.get("/studies/", {"state": "closed"}).content.decode()
        assert f"/studies/{study.pk}/" in listing
        dashboard = informaticist.get("/", **HX).content.decode()
        assert 'id="count-now-closed">1<' in dashboard and 'id="count-now-delivered">1<' in dashboard


class TestNothingToDeliverIsSettled:
    def test_an_inferred_study_without_destination_is_not_stuck(self, informaticist, pipeline):
        study = make_study(accession="TOUR1", state="inferred")
        make_result(study)
        Study.objects.filter(pk=study.pk).update(state_changed_at=timezone.now() - timedelta(hours=2))
        page = informaticist.get("/", **HX).content.decode()
        assert "TOUR1" not in page and "none stuck" in page
        detail = informaticist.get(f"/studies/{study.pk}/").content.decode()
        assert "Nothing to deliver" in detail and "every 3s" not in detail  # settled: the page stops polling


class TestDestinationHealth:
    def test_a_failed_test_is_kept_and_shown(self, client, users, pipeline):
        destination = pipeline["destination"]
        Destination.objects.filter(pk=destination.pk).update(port=free_port())
        client.force_login(users["superuser"])
        client.post(f"/endpoints/destinations/{destination.pk}/test/", **HX)
        destination.refresh_from_db()
        assert destination.last_test_ok is False and "cannot connect" in destination.last_test_detail
        page = client.get("/", **HX).content.decode()
        row = page.split(f'id="destination-health-{destination.pk}"')[0].rsplit("<tr>", 1)[1]
        assert "last Test failed" in row and "ok" not in row.replace("→", "")
        health = page.split(f'id="destination-health-{destination.pk}">')[1].split("</td>")[0]
        assert health.startswith("no delivery yet · Test failed ") and "ago: cannot connect" in health

    def test_an_open_circuit_says_until_when_and_holds_the_retry(self, informaticist, pipeline):
        destination = pipeline["destination"]
        until = timezone.now() + timedelta(minutes=2)
        Destination.objects.filter(pk=destination.pk).update(circuit_open_until=until, consecutive_failures=5)
        Delivery.objects.filter(pk=pipeline["delivery"].pk).update(state="pending", next_attempt_at=timezone.now())
        local = f"{timezone.localtime(until):%H:%M:%S}"
        page = informaticist.get("/", **HX).content.decode()
        assert f"circuit open until {local}" in page
        detail = informaticist.get(f"/studies/{pipeline['failed'].pk}/").content.decode()
        assert f"Next attempt at {local}: held by the circuit breaker of ris (open until {local})" in detail
        data = study_status_data(pipeline["failed"])["deliveries"][0]
        assert data["held_by_breaker"] is True and data["next_try_at"] == until.isoformat()
