"""The administrator's forms and the page layout in a real browser (Chromium through Playwright):
the destination form changes with its kind in place, everything works without JavaScript as
whole pages, and every page fits a 1,024 px wide screen without a console error."""

from __future__ import annotations

import re

import pytest

from tests.support.factories import make_destination, make_failed_delivery, make_result, make_study
from tests.test_browser_ui import WAIT_MS, login, screenshot

pytestmark = pytest.mark.usefixtures("plain_static_storage")

SMALL_SCREEN = {"width": 1024, "height": 768}


def new_page(browser, live_server, *, viewport=None, javascript: bool = True):
    context = browser.new_context(
        viewport=viewport or {"width": 1400, "height": 900}, base_url=live_server.url, java_script_enabled=javascript
    )
    context.set_default_timeout(WAIT_MS)
    return context, context.new_page()


class TestDestinationForm:
    def test_choosing_a_kind_swaps_in_its_fields_without_a_reload(self, browser, transactional_db, live_server):
        from results.models import Destination

        context, page = new_page(browser, live_server)
        try:
            login(page, "admin")
            page.goto("/endpoints/destinations/new/")
            page.evaluate("window.notReloaded = true")
            assert page.locator("#id_application_entity").count() == 1 and page.locator("#id_host").count() == 0
            page.fill("#id_name", "ris")
            page.select_option("#id_kind", "hl7")
            page.wait_for_selector("#id_hl7_message_type")
            assert page.locator("#id_application_entity").count() == 0
            assert page.input_value("#id_name") == "ris"  # what was typed stays
            assert page.input_value("#id_hl7_message_type") == "ORU^R01"
            assert page.evaluate("window.notReloaded") is True
            assert not page.locator("text=Show the fields").is_visible()  # with JavaScript, the select does it
            page.fill("#id_host", "ris.hospital.local")
            page.fill("#id_port", "2575")
            screenshot(page, "destination_form")
            page.click("button:has-text('Save')")
            page.wait_for_url(re.compile(r"/endpoints/$"))
            assert Destination.objects.get(name="ris").hl7_message_type == "ORU^R01"
        finally:
            context.close()

    def test_without_javascript_every_step_is_a_whole_page(self, browser, transactional_db, live_server):
        from routing.models import ApplicationEntity

        entity = ApplicationEntity.objects.create(ae_title="DEMO_MODALITY", host="127.0.0.1")
        context, page = new_page(browser, live_server, javascript=False)
        try:
            login(page, "admin")
            page.goto("/endpoints/destinations/new/")
            page.select_option("#id_kind", "fhir")
            page.click("text=Show the fields for this kind")
            page.wait_for_selector("#id_base_url")
            assert page.locator("nav").count() == 1 and page.locator("#id_application_entity").count() == 0
            page.goto("/endpoints/")
            page.locator(f"#ae-{entity.pk} button:has-text('Test')").click()
            page.wait_for_url(re.compile(rf"/endpoints/ae/{entity.pk}/test/$"))
            assert page.locator("nav").count() == 1  # a whole page, not a bare fragment
            assert "This AE title has no port" in page.inner_text("main")
            page.click("text=Back to the endpoints")
            page.wait_for_url(re.compile(r"/endpoints/$"))
        finally:
            context.close()


class TestSmallScreen:
    def test_every_page_fits_1024_px_without_console_errors(
        self,
        browser,
        transactional_db,
        live_server,
    ):
        from django.utils import timezone

        from routing.models import ApplicationEntity, RoutingRule, StudyEvent

        pacs = ApplicationEntity.objects.create(
            ae_title="MAIN_PACS_ARCHIVE", host="pacs-archive-01.radiology.hospital.example", port=11112
        )
        pacs.description = "Main archive of the radiology department, second floor, building C"
        pacs.save()
        rule = RoutingRule.objects.create(name="CT head bleed", description="Non-contrast head CT from the ED")
        rule.conditions.create(attribute="BodyPartExamined", operator="one_of", value="HEAD\\BRAIN\\SKULL\\NECK")
        rule.conditions.create(attribute="StudyDescription", operator="regex", value="(non.?contrast|NCCT|sans)")
        ris = make_destination(name="ris-main-department")
        ris.rules.add(rule)
        studies = []
        for n in range(6):
            study = make_study(accession=f"A{n:015d}", state="failed" if n % 2 else "delivered", minutes_ago=30 - n)
            study.study_description = "CT HEAD WITHOUT CONTRAST EMERGENCY DEPARTMENT PROTOCOL"
            study.save()
            result = make_result(study, score=0.2 + n / 10)
            if n % 2:
                make_failed_delivery(study, result, ris)
            studies.append(study)
        for _ in range(3):
            StudyEvent.objects.create(
                study=studies[1],
                kind="delivery_failed",
                at=timezone.now(),
                detail="ris-main-department: cannot connect to 127.0.0.1:2575 (Connection refused) "
                + "retry at 01:52:54, attempt 3 of 8" * 2,
            )
        context, page = new_page(browser, live_server, viewport=SMALL_SCREEN)
        problems: list[str] = []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        try:
            login(page, "superuser")
            for url, ready in [
                ("/", "#dashboard-panel"),
                ("/studies/", "#study-table"),
                (f"/studies/{studies[1].pk}/", "#study-live"),
                ("/failures/", "#failure-table"),
                ("/endpoints/", "#endpoint-tables"),
                ("/endpoints/destinations/new/", "#config-form"),
                (f"/endpoints/ae/{pacs.pk}/assess/", "text=Run the assessment"),
                ("/rules/", "#rule-table"),
                ("/rules/dry-run/", "#dry-run"),
                ("/models/", "#model-table"),
                ("/audit/triage/", "#triage-table"),
                ("/audit/log/", "#audit-table"),
            ]:
                page.goto(url)
                page.wait_for_selector(ready)
                width = page.evaluate("document.documentElement.scrollWidth")
                if width > SMALL_SCREEN["width"]:
                    problems.append(f"{url} is {width} px wide at {SMALL_SCREEN['width']} px")
                # Each table fits its card (a scrolling card would hide a table that does not).
                wider = page.evaluate(
                    "[...document.querySelectorAll('main table')]"
                    ".filter(t => t.getBoundingClientRect().right > t.parentElement.getBoundingClientRect().right + 1)"
                    ".map(t => t.closest('[id]') ? t.closest('[id]').id : t.outerHTML.slice(0, 60))"
                )
                if wider:
                    problems.append(f"{url}: tables wider than their card: {wider}")
                screenshot(page, "small_screen" + re.sub(r"\W+", "_", url).rstrip("_"))
            assert problems == []
        finally:
            context.close()


class TestAssessPage:
    def test_the_report_scrolls_in_its_own_panel_on_its_own_page(self, browser, transactional_db, live_server):
        from routing.models import ApplicationEntity
        from tests.support.net import free_port

        entity = ApplicationEntity.objects.create(ae_title="DEAD_NODE", host="127.0.0.1", port=free_port())
        context, page = new_page(browser, live_server, viewport=SMALL_SCREEN)
        try:
            login(page, "admin")
            page.goto("/endpoints/")
            page.locator(f"#ae-{entity.pk} a:has-text('Assess')").click()
            page.wait_for_url(re.compile(rf"/endpoints/ae/{entity.pk}/assess/$"))
            page.click("button:has-text('Run the assessment')")
            page.wait_for_selector("pre.assessment")
            assert "Integration assessment of DEAD_NODE" in page.inner_text("pre.assessment")
            assert page.evaluate("document.documentElement.scrollWidth") <= SMALL_SCREEN["width"]
            panel = page.evaluate(
                "(() => { const p = document.querySelector('pre.assessment');"
                " return [p.getBoundingClientRect().right, getComputedStyle(p).overflowX]; })()"
            )
            assert panel[0] <= SMALL_SCREEN["width"] and panel[1] == "auto"
            screenshot(page, "assessment")
        finally:
            context.close()
