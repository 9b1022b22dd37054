"""The pages' actions: configuration forms with inline validation, Test buttons, reorder, retry,
discard, re-run, re-deliver; each one audited."""

from __future__ import annotations

import pytest

from results.models import Delivery, Destination
from routing.models import ApplicationEntity, AuditEntry, RoutingRule, Study
from tests.support.factories import make_failed_delivery, make_result, make_study
from tests.support.mllp import MLLPListener
from tests.support.net import free_port

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("plain_static_storage")]
HX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def admin(client, users):
    client.force_login(users["admin"])
    return client


@pytest.fixture
def informaticist(client, users):
    client.force_login(users["informaticist"])
    return client


class TestApplicationEntityForm:
    def test_errors_show_inline_next_to_their_field(self, admin):
        response = admin.post("/endpoints/ae/new/", {"ae_title": "BAD\\AE", "receives_results": "on"}, **HX)
        page = response.content.decode()
        assert response.status_code == 200 and "<html" not in page and 'id="config-form"' in page
        assert 'id="id_ae_title-errors"' in page and "cannot contain a backslash" in page
        assert 'id="id_host-errors"' in page and 'id="id_port-errors"' in page
        assert not ApplicationEntity.objects.exists()

    def test_it_creates_audits_and_goes_back_to_the_list(self, admin):
        response = admin.post(
            "/endpoints/ae/new/",
            {"ae_title": "PACS1", "host": "10.0.0.5", "port": "104", "enabled": "on", "receives_results": "on"},
            **HX,
        )
        assert response["HX-Redirect"] == "/endpoints/"
        entity = ApplicationEntity.objects.get(ae_title="PACS1")
        entry = AuditEntry.objects.get(action="create")
        assert (entry.actor, entry.object_id, entry.before, entry.after["port"]) == ("admin", str(entity.pk), None, 104)

    def test_edit_records_before_and_after(self, admin):
        # check_peer_ip as the form below posts it (unticked), so only the host changes
        entity = ApplicationEntity.objects.create(ae_title="PACS1", host="10.0.0.5", port=104, check_peer_ip=False)
        admin.post(
            f"/endpoints/ae/{entity.pk}/", {"ae_title": "PACS1", "host": "10.0.0.6", "port": "104", "enabled": "on"}
        )
        entry = AuditEntry.objects.get(action="update")
        assert entry.changed_fields[0][0] == "host" and ("host", "10.0.0.5", "10.0.0.6") in entry.changed_fields

    def test_disable_and_enable(self, admin):
        entity = ApplicationEntity.objects.create(ae_title="PACS1")
        page = admin.post(f"/endpoints/ae/{entity.pk}/toggle/", **HX).content.decode()
        entity.refresh_from_db()
        assert not entity.enabled and 'id="endpoint-tables"' in page and ">Enable<" in page
        assert AuditEntry.objects.filter(action="disable", object_id=str(entity.pk)).exists()

    def test_the_test_button_reports_a_dead_node_inline(self, admin):
        entity = ApplicationEntity.objects.create(ae_title="NOBODY", host="127.0.0.1", port=free_port())
        page = admin.post(f"/endpoints/ae/{entity.pk}/test/", **HX).content.decode()
        assert "failed" in page and "cannot connect" in page and " ms" in page
        assert AuditEntry.objects.get(action="test").detail.startswith("failed")

    def test_assess_reports_what_a_live_node_supports_inline(self, admin, transactional_db, data_dir):
        from routing.receive.listener import DicomListener

        listener = DicomListener(host="127.0.0.1", port=0, ae_title="OTHERNODE")
        listener.start()
        try:
            entity = ApplicationEntity.objects.create(ae_title="OTHERNODE", host="127.0.0.1", port=listener.port)
            page = admin.post(f"/endpoints/ae/{entity.pk}/assess/", **HX).content.decode()
        finally:
            listener.stop(grace=1)
        assert "Integration assessment of OTHERNODE" in page
        assert "C-ECHO" in page and "<html" not in page
        assert AuditEntry.objects.get(action="test").detail == "integration assessment"

    def test_the_endpoints_page_offers_assess_and_the_conformance_statement(self, admin):
        ApplicationEntity.objects.create(ae_title="PACS", host="127.0.0.1", port=104)
        page = admin.get("/endpoints/").content.decode()
        assert "Assess" in page and 'href="/conformance"' in page

    def test_the_test_button_needs_an_address(self, admin):
        entity = ApplicationEntity.objects.create(ae_title="SENDER")
        page = admin.post(f"/endpoints/ae/{entity.pk}/test/", **HX).content.decode()
        assert "has no host and port" in page


class TestDestinationForm:
    def test_kind_specific_validation_shows_inline(self, admin):
        page = admin.post(
            "/endpoints/destinations/new/",
            {"name": "ris", "kind": "hl7", "host": "ris.local", "hl7_message_type": "ORU^R01", **_defaults()},
            **HX,
        ).content.decode()
        assert 'id="id_port-errors"' in page and "needs the RIS MLLP port" in page

    def test_the_secret_is_write_only(self, admin):
        destination = Destination.objects.create(
            name="web", kind="dicomweb", base_url="https://pacs.example/dicom-web", auth="bearer", secret="first-token"
        )
        data = {
            **_defaults(),  # its auth "none" would be a change of auth, which drops the secret
            "name": "web",
            "kind": "dicomweb",
            "base_url": "https://pacs.example/dicom-web",
            "auth": "bearer",
            "enabled": "on",
        }
        response = admin.post(f"/endpoints/destinations/{destination.pk}/", data, **HX)
        assert response["HX-Redirect"] == "/endpoints/"
        destination.refresh_from_db()
        assert destination.secret == "first-token"  # left empty: unchanged
        admin.post(f"/endpoints/destinations/{destination.pk}/", {**data, "secret": "second-token"}, **HX)
        destination.refresh_from_db()
        assert destination.secret == "second-token"
        for entry in AuditEntry.objects.filter(action="update"):
            # (field names such as oauth_token_url say "token" too: look for the values)
            assert "first-token" not in str(entry.before) + str(entry.after)
            assert "second-token" not in str(entry.before) + str(entry.after)
            assert entry.after["secret"] == "********"

    def test_the_test_button_connects_to_the_mllp_port(self, admin):
        server = MLLPListener()
        try:
            destination = Destination.objects.create(
                name="ris", kind="hl7", host="127.0.0.1", port=server.port, hl7_message_type="ORU^R01"
            )
            page = admin.post(f"/endpoints/destinations/{destination.pk}/test/", **HX).content.decode()
            assert "success" in page and f"127.0.0.1:{server.port} accepted" in page
        finally:
            server.server.shutdown()
            server.server.server_close()
        page = admin.post(f"/endpoints/destinations/{destination.pk}/test/", **HX).content.decode()
        assert "failed" in page and "cannot connect" in page


class TestRules:
    def test_create_with_conditions_and_inline_errors(self, admin):
        data = _rule_form("Head CT", [("Modality", "equals", "CT"), ("StudyDescription", "regex", "(")])
        page = admin.post("/rules/new/", data, **HX).content.decode()
        assert "invalid regular expression" in page and not RoutingRule.objects.exists()
        data = _rule_form("Head CT", [("Modality", "equals", "CT"), ("BodyPartExamined", "one_of", "HEAD\\BRAIN")])
        assert admin.post("/rules/new/", data, **HX)["HX-Redirect"] == "/rules/"
        rule = RoutingRule.objects.get()
        # A DICOM multi-value reads as typed, with one backslash: in the rule, its list and the audit log.
        assert [str(c) for c in rule.conditions.all()] == [
            "Modality equals 'CT'",
            "BodyPartExamined is one of 'HEAD\\BRAIN'",
        ]
        assert AuditEntry.objects.get(action="create").after["conditions"][0] == "Modality equals 'CT'"
        assert "is one of &#x27;HEAD\\BRAIN&#x27;" in admin.get("/rules/").content.decode()

    def test_the_audit_log_shows_a_changed_multi_value_as_typed(self, admin, client, users):
        data = _rule_form("Head CT", [("BodyPartExamined", "one_of", "HEAD\\BRAIN")])
        admin.post("/rules/new/", data, **HX)
        rule = RoutingRule.objects.get()
        edit = _rule_form("Head CT", [("BodyPartExamined", "one_of", "HEAD\\BRAIN\\SKULL")])
        condition = rule.conditions.get()
        edit.update({"conditions-INITIAL_FORMS": "1", "conditions-0-id": str(condition.pk)})
        assert admin.post(f"/rules/{rule.pk}/", edit, **HX)["HX-Redirect"] == "/rules/"
        client.force_login(users["superuser"])
        page = client.get("/audit/log/").content.decode()
        assert "is one of &#x27;HEAD\\BRAIN&#x27; → BodyPartExamined is one of &#x27;HEAD\\BRAIN\\SKULL&#x27;" in page
        assert "\\\\" not in page

    def test_reorder_and_toggle(self, admin):
        first = RoutingRule.objects.create(name="first", position=10)
        second = RoutingRule.objects.create(name="second", position=20)
        page = admin.post(f"/rules/{second.pk}/move/", {"direction": "up"}, **HX).content.decode()
        assert page.index("second") < page.index("first")
        assert list(RoutingRule.objects.values_list("name", flat=True)) == ["second", "first"]
        assert AuditEntry.objects.get(action="reorder").after == {"order": ["second", "first"]}
        admin.post(f"/rules/{first.pk}/toggle/", **HX)
        first.refresh_from_db()
        assert not first.enabled


class TestFailureQueue:
    def test_retry_one_keeps_it_listed_and_polls(self, informaticist, pipeline):
        delivery = pipeline["delivery"]
        response = informaticist.post("/failures/retry/", {"delivery": delivery.pk}, **HX)
        page = response.content.decode()
        delivery.refresh_from_db()
        assert (
            delivery.state == "pending"
            and delivery.idempotency_key == f"PL{delivery.result_id}D{delivery.destination_id}"
        )
        assert f'id="delivery-{delivery.pk}" data-state="pending"' in page
        assert 'hx-trigger="every 2s"' in page
        assert response["HX-Push-Url"] == f"/failures/?watch={delivery.pk}"
        assert AuditEntry.objects.get(action="retry").actor == "informaticist"

    def test_retry_selected_and_all_of_a_destination(self, informaticist, pipeline):
        other = make_study(accession="ACC300", state="failed")
        second = make_failed_delivery(other, make_result(other), pipeline["destination"], error_class="transient")
        informaticist.post("/failures/retry/", {"selected": [second.pk]}, **HX)
        assert Delivery.objects.get(pk=second.pk).state == "pending"
        assert Delivery.objects.get(pk=pipeline["delivery"].pk).state == "failed"
        page = informaticist.get("/failures/", {"destination": pipeline["destination"].pk}).content.decode()
        assert "Retry all 1 failed for ris" in page
        informaticist.post("/failures/retry/", {"destination_all": pipeline["destination"].pk}, **HX)
        assert Delivery.objects.get(pk=pipeline["delivery"].pk).state == "pending"

    def test_filter_by_error_class(self, informaticist, pipeline):
        page = informaticist.get("/failures/", {"error_class": "transient"}, **HX).content.decode()
        assert f'id="delivery-{pipeline["delivery"].pk}"' not in page
        page = informaticist.get("/failures/", {"error_class": "permanent"}, **HX).content.decode()
        assert f'id="delivery-{pipeline["delivery"].pk}"' in page

    def test_discard_needs_a_reason(self, informaticist, pipeline):
        delivery = pipeline["delivery"]
        page = informaticist.post(f"/failures/{delivery.pk}/discard/", {"reason": "  "}, **HX).content.decode()
        assert "A reason is required" in page
        delivery.refresh_from_db()
        assert delivery.state == "failed"
        response = informaticist.post(
            f"/failures/{delivery.pk}/discard/", {"reason": "Order cancelled in the RIS"}, **HX
        )
        assert response["HX-Retarget"] == "#failure-table"
        delivery.refresh_from_db()
        assert (delivery.state, delivery.discarded_by, delivery.discard_reason) == (
            "discarded",
            "informaticist",
            "Order cancelled in the RIS",
        )
        assert "Order cancelled" in AuditEntry.objects.get(action="discard").detail


class TestStudyActions:
    def test_rerun_sends_the_study_back_and_enqueues_it(
        self, informaticist, pipeline, django_capture_on_commit_callbacks
    ):
        study = pipeline["done"]
        with django_capture_on_commit_callbacks() as callbacks:
            response = informaticist.post(f"/studies/{study.pk}/rerun/", **HX)
        assert "Inference will run again" in response.content.decode() and "study-changed" in response["HX-Trigger"]
        assert len(callbacks) == 1
        study.refresh_from_db()
        assert study.state == "complete"
        assert study.events.last().kind == "rerun" and "informaticist" in study.events.last().detail
        assert AuditEntry.objects.get(action="rerun").object_id == str(study.pk)

    def test_rerun_waits_for_a_study_in_flight(self, informaticist, pipeline):
        Study.objects.filter(pk=pipeline["done"].pk).update(state="inferring")
        page = informaticist.post(f"/studies/{pipeline['done'].pk}/rerun/", **HX).content.decode()
        assert "wait until the pipeline is done" in page
        assert Study.objects.get(pk=pipeline["done"].pk).state == "inferring"

    def test_redeliver(self, informaticist, pipeline):
        page = informaticist.post(f"/studies/{pipeline['failed'].pk}/redeliver/", **HX).content.decode()
        assert "1 delivery queued again" in page
        assert Delivery.objects.get(pk=pipeline["delivery"].pk).state == "pending"

    def test_without_htmx_they_redirect_with_a_message(self, informaticist, pipeline):
        response = informaticist.post(f"/studies/{pipeline['failed'].pk}/redeliver/", follow=True)
        assert "1 delivery queued again" in response.content.decode()


def _defaults() -> dict:
    return {
        "timeout_seconds": "10",
        "max_attempts": "8",
        "backoff_base_seconds": "10",
        "backoff_cap_seconds": "1800",
        "breaker_threshold": "5",
        "breaker_cooldown_seconds": "60",
        "on_ack_error": "fail",
        "on_ack_reject": "retry",
        "hl7_version": "2.5.1",
        "accession_field": "OBR-18",
        "auth": "none",
    }


def _rule_form(name: str, conditions: list[tuple[str, str, str]]) -> dict:
    data = {
        "name": name,
        "enabled": "on",
        "priority": "5",
        "stop_at_first_match": "on",
        "conditions-TOTAL_FORMS": str(len(conditions)),
        "conditions-INITIAL_FORMS": "0",
        "conditions-MIN_NUM_FORMS": "0",
        "conditions-MAX_NUM_FORMS": "1000",
    }
    for i, (attribute, operator, value) in enumerate(conditions):
        data.update(
            {
                f"conditions-{i}-attribute": attribute,
                f"conditions-{i}-operator": operator,
                f"conditions-{i}-value": value,
            }
        )
    return data
