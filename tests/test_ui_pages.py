"""Every page renders whole, and as its htmx fragment (no <html>), showing what it should."""

from __future__ import annotations

import pytest
from django.utils import timezone

from results.models import Destination
from routing.models import AuditEntry, Study
from tests.support.factories import make_study

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("plain_static_storage")]

# URL (with {placeholders} from the pipeline fixture) -> the id of the fragment's root element.
PAGES = {
    "/": "dashboard-panel",
    "/studies/": "study-table",
    "/studies/{done}/": "study-live",
    "/failures/": "failure-table",
    "/endpoints/": "endpoint-tables",
    "/rules/": "rule-table",
    "/rules/dry-run/": "dry-run",
    "/rules/new/": "rule-form",
    "/endpoints/ae/new/": "config-form",
    "/endpoints/destinations/new/": "config-form",
    "/models/": "model-table",
    "/audit/triage/": "triage-table",
    "/audit/log/": "audit-table",
}


@pytest.fixture
def root(client, users):
    client.force_login(users["superuser"])
    return client


def url_of(template: str, pipeline: dict) -> str:
    return template.format(done=pipeline["done"].pk)


class TestTwoRenderings:
    @pytest.mark.parametrize("template", list(PAGES))
    def test_full_page_and_fragment(self, root, pipeline, template):
        url = url_of(template, pipeline)
        full = root.get(url).content.decode()
        assert full.startswith("<!DOCTYPE html>") and f'id="{PAGES[template]}"' in full
        assert "/static/django_htmx/htmx-2.min.js" in full  # served by us, not a CDN
        fragment = root.get(url, HTTP_HX_REQUEST="true").content.decode()
        assert "<html" not in fragment and "<nav" not in fragment.split(f'id="{PAGES[template]}"')[0]
        assert f'id="{PAGES[template]}"' in fragment

    def test_a_boosted_request_gets_the_whole_page(self, root, pipeline):
        page = root.get("/studies/", HTTP_HX_REQUEST="true", HTTP_HX_BOOSTED="true").content.decode()
        assert "<html" in page


class TestDashboard:
    def test_it_shows_states_deliveries_latency_and_health(self, root, pipeline):
        page = root.get("/").content.decode()
        assert 'hx-trigger="every 5s"' in page
        assert "Studies by state" in page and "Delivered" in page
        assert "ris" in page and "Failed" in page
        assert "receiving → complete" in page and "20.0 s" in page  # the pipeline fixture's event spacing
        assert "DICOM listener" in page and "Workers" in page

    def test_health_comes_from_the_heartbeats_like_healthz(self, root, pipeline):
        from routing.models import Heartbeat

        page = root.get("/", HTTP_HX_REQUEST="true").content.decode()
        assert "no process has ever reported" in page and "down" in page
        Heartbeat.beat(role="listener", identity="host:1", detail={})
        page = root.get("/", HTTP_HX_REQUEST="true").content.decode()
        assert "1 process(es), last beat" in page

    def test_stuck_studies_are_listed(self, root, pipeline):
        study = make_study(accession="STUCK1", state="routed")
        Study.objects.filter(pk=study.pk).update(state_changed_at=timezone.now() - timezone.timedelta(hours=2))
        page = root.get("/", HTTP_HX_REQUEST="true").content.decode()
        assert "STUCK1" in page and f"/studies/{study.pk}/" in page


class TestStudies:
    def test_filters_search_and_sort(self, root, pipeline):
        page = root.get("/studies/", {"state": "failed"}, HTTP_HX_REQUEST="true").content.decode()
        assert "ACC200" in page and "ACC100" not in page
        page = root.get("/studies/", {"q": "acc100"}, HTTP_HX_REQUEST="true").content.decode()
        assert "ACC100" in page and "ACC200" not in page
        page = root.get("/studies/", {"q": pipeline["failed"].study_instance_uid}).content.decode()
        assert "ACC200" in page and "ACC100" not in page
        page = root.get("/studies/", {"flag": "no"}, HTTP_HX_REQUEST="true").content.decode()
        assert "ACC100" not in page  # its current (superseding) result is flagged
        page = root.get("/studies/", {"modality": "MR"}, HTTP_HX_REQUEST="true").content.decode()
        assert "No study matches" in page
        page = root.get("/studies/", {"calling_ae": "modality1", "sort": "accession"}).content.decode()
        assert page.index("ACC100") < page.index("ACC200")
        page = root.get("/studies/", {"sort": "-accession"}).content.decode()
        assert page.index("ACC200") < page.index("ACC100")

    def test_sort_links_and_pages_are_bookmarkable(self, root, pipeline):
        for n in range(30):
            make_study(accession=f"P{n:03d}")
        page = root.get("/studies/", {"state": "delivered"}).content.decode()
        assert 'hx-push-url="true"' in page
        assert "?state=delivered&amp;page=2" in page
        assert "sort=received" in page

    def test_patient_data_is_escaped(self, root, pipeline):
        page = root.get("/studies/").content.decode()
        assert "ZZTEST^&lt;b&gt;ESCAPE&lt;/b&gt;" in page and "<b>ESCAPE</b>" not in page
        detail = root.get(f"/studies/{pipeline['failed'].pk}/").content.decode()
        assert "&lt;b&gt;ESCAPE" in detail and "<b>ESCAPE" not in detail

    def test_detail_shows_timeline_results_and_deliveries(self, root, pipeline):
        page = root.get(f"/studies/{pipeline['failed'].pk}/").content.decode()
        assert "+20.0 s" in page  # time since the previous event
        assert "RIS answered AE" in page and "ris" in page and "Failed" in page
        assert "Re-run inference" in page and "Re-deliver" in page
        done = root.get(f"/studies/{pipeline['done'].pk}/").content.decode()
        assert "superseded" in done and "current" in done and "0.900" in done and "0.200" in done


class TestOtherPages:
    def test_endpoints_never_show_a_secret(self, root, pipeline):
        Destination.objects.create(
            name="web", kind="dicomweb", base_url="https://pacs.example/dicom-web", auth="bearer", secret="s3cr3t-token"
        )
        page = root.get("/endpoints/").content.decode()
        assert "web" in page and "secret set" in page and "s3cr3t-token" not in page
        form = root.get(f"/endpoints/destinations/{Destination.objects.get(name='web').pk}/").content.decode()
        assert "s3cr3t-token" not in form and "(unchanged)" in form

    def test_models_page_shows_the_demonstration_label_and_counts(self, root, pipeline):
        page = root.get("/models/").content.decode()
        assert "not for clinical use" in page and "ab" * 32 in page
        assert "2 studies (3 results)" in page

    def test_dry_run_explains_each_condition(self, root, pipeline):
        pipeline["rule"].conditions.create(attribute="Modality", operator="equals", value="MR")
        page = root.get("/rules/dry-run/", {"study": pipeline["done"].pk}).content.decode()
        assert "Modality equals &#x27;MR&#x27;" in page and "no match" in page and "CT" in page
        page = root.get("/rules/dry-run/", {"study": 999999}, HTTP_HX_REQUEST="true").content.decode()
        assert "No study has this accession number, Study UID or id." in page and "No study received" not in page

    @pytest.mark.parametrize("query", ["", "?page=1", "?flag=yes&page=1"])
    def test_the_triage_audit_is_audited_also_as_an_htmx_fragment(self, root, pipeline, query):
        response = root.get(f"/audit/triage/{query}", HTTP_HX_REQUEST="true")
        assert response.status_code == 200 and "<html" not in response.content.decode()
        assert AuditEntry.objects.filter(action="view_audit", actor="root").count() == 1

    def test_audit_log_lists_entries(self, root, pipeline):
        AuditEntry.record(
            actor="admin",
            action="update",
            obj=pipeline["rule"],
            object_repr="CT head",
            before={"enabled": True},
            after={"enabled": False},
        )
        page = root.get("/audit/log/", {"action": "update"}, HTTP_HX_REQUEST="true").content.decode()
        assert "CT head" in page and "enabled" in page and "True → False" in page
