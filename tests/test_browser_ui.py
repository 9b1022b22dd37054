"""The staff UI in a real browser: Playwright driving Debian's Chromium against a live test server.

One browser for the whole session (the `browser` fixture of tests/support/browser.py); each test
gets a fresh context, so no cookies leak between roles. A screenshot of every main page lands in tests/artifacts/ (ignored by git). Waits are
conditions (an element's state), never timings.
"""

from __future__ import annotations

import csv
import re
import threading
from pathlib import Path

import pytest

from tests.support.factories import (
    PASSWORD,
    hl7_destination,
    inferred_study,
    make_destination,
    make_failed_delivery,
    make_result,
    make_study,
    make_user,
)
from tests.support.mllp import MLLPListener

pytestmark = pytest.mark.usefixtures("plain_static_storage")

ARTIFACTS = Path(__file__).parent / "artifacts"
WAIT_MS = 15_000  # upper bound for a condition to come true; the tests never sleep


@pytest.fixture
def page(browser, transactional_db, live_server):
    context = browser.new_context(
        viewport={"width": 1400, "height": 900}, accept_downloads=True, base_url=live_server.url
    )
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    yield page
    context.close()


def login(page, role: str) -> None:
    user = make_user(role)
    page.goto("/login/")
    page.fill("input[name=username]", user.get_username())
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/$"))


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


class TestPacsAdministrator:
    def test_adds_an_ae_title_and_tests_it_against_a_running_listener(self, page, settings, data_dir):
        from routing.models import ApplicationEntity, AuditEntry
        from routing.receive.listener import DicomListener

        settings.DICOM_ACCEPT_ANY_CALLING_AE = True
        listener = DicomListener(host="127.0.0.1", port=0, ae_title="PACSLENS")
        listener.start()
        try:
            login(page, "admin")
            page.click("text=Endpoints")
            page.click("text=Add AE title")
            page.fill("#id_ae_title", "BAD\\TITLE")
            page.click("button:has-text('Save')")
            # Inline validation: the error appears next to the field, the page is not reloaded.
            page.wait_for_selector("#id_ae_title-errors:has-text('backslash')")
            page.fill("#id_ae_title", "PACSLENS")
            page.fill("#id_host", "127.0.0.1")
            page.fill("#id_port", str(listener.port))
            page.fill("#id_description", "Our own listener, for the Test button")
            page.click("button:has-text('Save')")
            page.wait_for_url(re.compile(r"/endpoints/$"))
            entity = ApplicationEntity.objects.get(ae_title="PACSLENS")
            row = page.locator(f"#ae-{entity.pk}")
            row.locator("button:has-text('Test')").click()
            result = row.locator(".probe")
            result.wait_for()
            text = result.inner_text()
            assert "success" in text and "C-ECHO accepted by PACSLENS" in text and "0x0000" in text and " ms" in text
            # A wrong called AE title: the rejection and its reason show inline too.
            entity.ae_title = "NOTLISTENER"
            entity.save()
            page.reload()
            row.locator("button:has-text('Test')").click()
            result.wait_for()
            assert "called AE title not recognised" in result.inner_text()
            screenshot(page, "endpoints")
            assert AuditEntry.objects.filter(action="create", object_repr="PACSLENS").exists()
            assert AuditEntry.objects.filter(action="test").count() == 2
        finally:
            listener.stop(grace=2)


class TestCodingProfile:
    def test_sets_the_ris_coding_and_the_next_result_carries_it(self, page, data_dir):
        from results.deliver.ledger import deliveries_create, deliveries_run_pending
        from routing.models import RoutingRule

        ris = MLLPListener()
        try:
            rule = RoutingRule.objects.create(name="CT head")
            destination = hl7_destination(rule, ris.port)
            login(page, "admin")
            page.click("text=Endpoints")
            page.locator("tr", has=page.locator("td", has_text=re.compile(r"^ris$"))).locator("text=Coding").click()
            page.wait_for_url(re.compile(rf"/endpoints/destinations/{destination.pk}/coding/$"))
            assert page.locator("#id_fhir_code_system").count() == 0, "only the HL7 fields"
            page.fill("#id_hl7_patient_id_authority", "HOSP")
            page.fill("#id_hl7_patient_id_type", "MR")
            page.check("input[name=hl7_order_number_fields][value='ORC-2']")
            page.check("input[name=hl7_order_number_fields][value='OBR-2']")
            page.select_option("#id_hl7_study_uid", "zds")
            page.fill("#id_hl7_flag_code", "PL0001")  # the score's code: refused inline
            page.click("button:has-text('Save')")
            page.wait_for_selector("#id_hl7_flag_code-errors:has-text('different codes')")
            page.fill("#id_hl7_flag_code", "AI-FLAG")
            screenshot(page, "coding_profile")
            page.click("button:has-text('Save')")
            page.wait_for_url(re.compile(r"/endpoints/$"))

            study, result = inferred_study(data_dir)
            deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
            deliveries_run_pending()
            (message,) = ris.messages
            segments = {line[:3]: line.split("|") for line in message.split("\r")}
            assert segments["PID"][3] == f"{study.patient_id}^^^HOSP^MR"
            assert segments["ORC"][2] == segments["OBR"][2] == study.accession_number
            assert segments["ZDS"][1].startswith(study.study_instance_uid + "^")
            assert "AI-FLAG^AI triage finding^99PACSLENS" in message
        finally:
            ris.stop()


class TestInformaticist:
    def test_retries_a_failed_delivery_and_watches_it_turn_delivered(self, page, data_dir):
        from results.deliver.ledger import deliveries_create, deliveries_run_pending
        from results.models import Delivery
        from routing.models import RoutingRule

        ris = MLLPListener()
        port = ris.port
        ris.server.shutdown()
        ris.server.server_close()  # the RIS is down
        rule = RoutingRule.objects.create(name="CT head")
        hl7_destination(rule, port, max_attempts=1)
        study, result = inferred_study(data_dir)
        Delivery.objects.filter(
            pk__in=[d.pk for d in deliveries_create(study=study, results=[result], rule_ids=[rule.pk])]
        )
        deliveries_run_pending()
        delivery = Delivery.objects.get()
        assert delivery.state == "failed"

        login(page, "informaticist")
        page.click("text=Failure queue")
        row = page.locator(f"#delivery-{delivery.pk}")
        assert row.get_attribute("data-state") == "failed"
        assert "cannot connect" in row.inner_text().lower() or "refused" in row.inner_text().lower()
        page.evaluate("window.notReloaded = true")

        back = MLLPListener(port=port)  # the RIS comes back
        try:
            row.locator("button:has-text('Retry')").click()
            page.wait_for_selector(f"#delivery-{delivery.pk}[data-state=pending]")
            screenshot(page, "failure_queue_pending")
            worker = threading.Thread(target=deliveries_run_pending)
            worker.start()
            worker.join()
            # The table polls itself: the same row turns delivered without a reload.
            page.wait_for_selector(f"#delivery-{delivery.pk}[data-state=delivered]")
            assert page.evaluate("window.notReloaded") is True
            assert "watch=" in page.url  # the state of the page is in its URL
            assert back.received == [delivery.idempotency_key]
            screenshot(page, "failure_queue")
            page.click(f"#delivery-{delivery.pk} a")
            page.wait_for_selector("#study-live")
            assert "Delivered" in page.locator("#study-live").inner_text()
            screenshot(page, "study_detail")
        finally:
            back.server.shutdown()
            back.server.server_close()

    def test_gets_403_on_the_audit_page(self, page):
        login(page, "informaticist")
        assert page.locator("text=Triage audit").count() == 0
        response = page.goto("/audit/triage/")
        assert response.status == 403
        assert "403 Forbidden" in page.inner_text("h1")
        screenshot(page, "forbidden")


class TestDailyQueue:
    def test_retry_all_discard_and_re_deliver_say_what_they_did(self, page):
        from results.models import Delivery
        from routing.models import Study

        ris, pacs = make_destination(name="ris"), make_destination(name="pacs", port=2576)
        cancelled = make_study(accession="ACC7001", state="failed")
        make_failed_delivery(cancelled, make_result(cancelled), ris)
        down = make_study(accession="ACC7002", state="failed")
        waiting = make_failed_delivery(down, make_result(down), pacs)
        done = make_study(accession="ACC7003", state="delivered")
        sent = make_failed_delivery(done, make_result(done), ris)
        Delivery.objects.filter(pk=sent.pk).update(state="delivered")

        login(page, "informaticist")
        page.click("text=Failure queue")
        # Retry all of one destination, without choosing it in the filter first.
        page.click("button:has-text('Retry all 1 failed for pacs')")
        page.wait_for_selector("#queue-message:has-text('1 delivery to pacs queued again')")
        page.wait_for_selector(f"#delivery-{waiting.pk}[data-state=pending]")
        # Discard with a reason: confirmed, and the study is closed, not delivered.
        row = page.locator("tr:has-text('ACC7001')")
        row.locator("a:has-text('Discard')").click()
        page.fill("textarea[name=reason], input[name=reason]", "Order cancelled in the RIS")
        page.click("button:has-text('Discard')")
        page.wait_for_selector("#queue-message:has-text('discarded')")
        assert Study.objects.get(pk=cancelled.pk).state == "closed"
        page.goto(f"/studies/{cancelled.pk}/")
        assert "Closed (discarded)" in page.inner_text("#study-live")
        # Re-deliver a delivered study: it asks first, and only the confirmation sends.
        page.goto(f"/studies/{done.pk}/")
        page.click("button:has-text('Re-deliver')")
        page.wait_for_selector("#redeliver-confirm:has-text('already delivered to ris')")
        assert Delivery.objects.get(pk=sent.pk).state == "delivered"
        screenshot(page, "redeliver_confirm")
        page.click("#redeliver-confirm button:has-text('Send again')")
        page.wait_for_selector("#study-message:has-text('1 delivery queued again')")
        assert Delivery.objects.get(pk=sent.pk).state == "pending"

    def test_a_pacs_administrator_reads_the_queue(self, page):
        destination = make_destination(name="ris")
        study = make_study(accession="ACC7101", state="failed")
        failed = make_failed_delivery(study, make_result(study), destination)
        login(page, "admin")
        page.click("text=Failure queue")
        row = page.locator(f"#delivery-{failed.pk}")
        assert "RIS answered AE" in row.inner_text()
        assert page.locator("button:has-text('Retry')").count() == 0
        assert "Read-only" in page.inner_text("#failure-table")


class TestSuperuser:
    def test_filters_the_triage_audit_and_downloads_the_csv(self, page, tmp_path):
        from routing.models import AuditEntry

        for n, score in enumerate([0.1, 0.45, 0.7, 0.95]):
            make_result(make_study(accession=f"AUD{n}"), score=score)
        login(page, "superuser")
        page.click("text=Triage audit")
        page.wait_for_selector("#triage-table")
        assert page.locator("#triage-table tr").count() == 5
        page.select_option("#id_flag", "yes")
        page.fill("#id_score_min", "0.9")
        page.click("#triage-filters button:has-text('Filter')")
        page.wait_for_function("document.querySelectorAll('#triage-table tr').length === 2")
        assert "flag=yes" in page.url and "score_min=0.9" in page.url
        screenshot(page, "triage_audit")
        with page.expect_download() as download_info:
            page.click("#csv-export")
        path = tmp_path / "export.csv"
        download_info.value.save_as(path)
        rows = list(csv.DictReader(path.open()))
        assert [(r["accession_number"], r["score"], r["flagged"]) for r in rows] == [("AUD3", "0.950000", "yes")]
        assert AuditEntry.objects.filter(action="view_audit", actor="root").exists()
        export = AuditEntry.objects.get(action="export_audit")
        assert "flag=yes" in export.detail and "AUD3" not in export.detail
        page.click("text=Audit log")
        page.wait_for_selector("#audit-table")
        assert "Exported the triage audit" in page.inner_text("#audit-table")
        screenshot(page, "audit_log")


class TestTour:
    def test_every_main_page_renders_for_the_screenshots(self, page, data_dir):
        from django.utils import timezone

        from routing.models import ApplicationEntity, Heartbeat, RoutingRule, StoreAssociation

        ApplicationEntity.objects.create(ae_title="CT_SCANNER_1", host="10.1.2.3", port=104, description="Emergency CT")
        StoreAssociation.objects.create(
            calling_ae_title="CT_SCANNER_1",
            called_ae_title="PACSLENS",
            ended_at=timezone.now(),
            released_normally=True,
            instances_received=3,
        )
        for role in ("listener", "workers", "tasks"):
            Heartbeat.beat(role=role, identity="pacslens-1:4242", detail={})
        rule = RoutingRule.objects.create(name="CT head bleed", description="Non-contrast head CT")
        rule.conditions.create(attribute="Modality", operator="equals", value="CT")
        rule.conditions.create(attribute="BodyPartExamined", operator="one_of", value="HEAD\\BRAIN")
        ris = make_destination()
        ris.rules.add(rule)
        for n, state in enumerate(["delivered", "delivered", "failed", "inferring", "receiving", "ignored"]):
            study = make_study(accession=f"ACC{n + 1:04d}", state=state, minutes_ago=60 - n * 7)
            if state in ("delivered", "failed"):
                result = make_result(study, score=0.3 + n * 0.2)
                if state == "failed":
                    make_failed_delivery(study, result, ris)
        login(page, "superuser")
        for name, url, ready in [
            ("dashboard", "/", "#dashboard-panel"),
            ("studies", "/studies/", "#study-table"),
            ("rules", "/rules/", "#rule-table"),
            ("dry_run", "/rules/dry-run/", "#dry-run"),
            ("models", "/models/", "#model-table"),
            ("endpoints_list", "/endpoints/", "#endpoint-tables"),
        ]:
            page.goto(url)
            page.wait_for_selector(ready)
            screenshot(page, name)
        # The dashboard refreshes itself: a study completing now shows up without a reload.
        page.goto("/")
        page.evaluate("window.notReloaded = true")
        assert page.inner_text("#count-now-complete") == "0"
        make_study(accession="NEW1", state="complete")
        page.wait_for_function("document.querySelector('#count-now-complete').innerText === '1'")
        assert page.evaluate("window.notReloaded") is True
        # Sorting through htmx pushes a bookmarkable URL.
        page.goto("/studies/")
        page.click("#study-table th a:has-text('Accession')")
        page.wait_for_url(re.compile(r"sort=accession"))


class TestAlerts:
    def test_adds_an_email_channel_and_sends_a_test_alert(self, page, smtp_server):
        from results.models import AlertChannel

        login(page, "admin")
        page.click("nav >> text=Alerts")
        page.click("text=Add channel")
        page.fill("#id_name", "it-team")
        page.select_option("#id_kind", "email")
        page.fill("#id_email_to", "not an address")
        page.click("button:has-text('Save')")
        page.wait_for_selector("#id_email_to-errors:has-text('is not an e-mail address')")
        page.fill("#id_email_to", "it@hospital.example")
        page.click("button:has-text('Save')")
        page.wait_for_url(re.compile(r"/alerts/$"))
        channel = AlertChannel.objects.get(name="it-team")
        row = page.locator(f"#channel-{channel.pk}")
        row.locator("button:has-text('Send test alert')").click()
        result = row.locator(".probe")
        result.wait_for()
        assert "test alert sent to it-team" in result.inner_text()
        assert smtp_server.messages[0][0] == ["it@hospital.example"]
        assert "Test alert" in smtp_server.messages[0][1]["Subject"]
        screenshot(page, "alerts")


class TestWebhooks:
    def test_adds_a_webhook_sees_its_secret_once_and_the_event_it_was_sent(self, page, webhook_receiver):
        from results.deliver.webhooks import webhook_events_record, webhooks_send_due
        from results.models import WebhookSubscription

        login(page, "admin")
        page.click("nav >> text=Webhooks")
        page.click("text=Add webhook")
        page.fill("#id_name", "mirth")
        page.fill("#id_webhook_url", "ftp://nowhere")
        page.check("input[value='result.flagged']")
        page.click("button:has-text('Save')")
        page.wait_for_selector("#id_webhook_url-errors:has-text('starting with https://')")
        page.fill("#id_webhook_url", webhook_receiver.url)
        page.click("button:has-text('Save')")
        subscription = WebhookSubscription.objects.get(name="mirth")
        assert page.inner_text("#new-secret") == subscription.secret
        study = make_study(accession="BROWSER1")
        webhook_events_record(event_type="result.flagged", study=study, result=make_result(study))
        assert webhooks_send_due() == 1
        page.goto("/webhooks/")
        assert subscription.secret not in page.content()
        page.wait_for_selector("#webhook-events :text('result.flagged')")
        screenshot(page, "webhooks")
