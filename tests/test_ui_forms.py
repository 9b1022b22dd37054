"""Forms a PACS administrator can fill in: a destination form per kind, human labels, one wording
for one error in the forms and the site YAML, precise Test messages, deleting what nothing uses,
and the small things of the study and dry-run pages."""

from __future__ import annotations

import re

import pytest

from pacslens.site_config.ae_titles import AE_TITLES
from pacslens.site_config.destinations import DestinationsSection
from pacslens.site_config.poll_sources import PollSourcesSection
from results.models import Destination
from routing.models import ApplicationEntity, AuditEntry, RoutingRule
from routing.validators import HOST_MESSAGE, NAME_MESSAGE, PORT_MESSAGE
from tests.support.factories import make_destination, make_result, make_study

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("plain_static_storage")]

HX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def admin(client, users):
    client.force_login(users["admin"])
    return client


def field_names(page: str) -> set[str]:
    return set(re.findall(r'<(?:input|select|textarea)[^>]* name="([a-z_0-9]+)"', page)) - {"csrfmiddlewaretoken"}


def retry_defaults() -> dict:
    return {
        "timeout_seconds": "10",
        "max_attempts": "8",
        "backoff_base_seconds": "10",
        "backoff_cap_seconds": "1800",
        "breaker_threshold": "5",
        "breaker_cooldown_seconds": "60",
    }


class TestDestinationFormPerKind:
    def test_a_new_destination_shows_the_dicom_fields_only(self, admin):
        page = admin.get("/endpoints/destinations/new/").content.decode()
        names = field_names(page)
        assert "application_entity" in names and "name" in names and "max_attempts" in names
        assert not names & {"host", "port", "hl7_message_type", "base_url", "secret", "username"}

    def test_changing_the_kind_swaps_in_that_kinds_fields_keeping_what_was_typed(self, admin):
        form = admin.get("/endpoints/destinations/new/").content.decode()
        # The kind select posts the form back (htmx) to get the fields of the new kind.
        select = re.search(r'<select name="kind"[^>]*>', form).group(0)
        assert 'hx-post="/endpoints/destinations/new/"' in select and 'hx-target="#config-form"' in select
        assert "_refresh" in select
        page = admin.post(
            "/endpoints/destinations/new/",
            {"name": "ris", "kind": "hl7", "description": "Main RIS", "_refresh": "kind"},
            **HX,
        ).content.decode()
        assert "<html" not in page and 'id="config-form"' in page
        assert {"host", "port", "hl7_message_type", "on_ack_reject"} <= field_names(page)
        assert not field_names(page) & {"application_entity", "base_url", "secret"}
        assert 'value="Main RIS"' in page and 'value="ris"' in page
        assert "errorlist" not in page  # shown again, not validated
        assert '<option value="ORU^R01" selected>' in page  # the default message type
        assert not Destination.objects.exists()

    def test_without_javascript_the_kind_switch_is_a_button_and_a_whole_page(self, admin):
        form = admin.get("/endpoints/destinations/new/").content.decode()
        assert '<button type="submit" name="_refresh" value="kind" class="without-js">' in form
        page = admin.post("/endpoints/destinations/new/", {"name": "web", "kind": "fhir", "_refresh": "kind"})
        page = page.content.decode()
        assert page.startswith("<!DOCTYPE html>") and {"base_url", "auth", "username", "secret"} <= field_names(page)

    def test_labels_are_words_and_secrets_are_not_filled_in_by_the_browser(self, admin):
        page = admin.post("/endpoints/destinations/new/", {"kind": "hl7", "_refresh": "kind"}, **HX).content.decode()
        for label in (
            "HL7 message type",
            "MLLP port",
            "Sending application (MSH-3)",
            "Attempts before the failure queue",
        ):
            assert f">{label}</label>" in page
        for raw in ("Hl7 message type", "Ae title", "On ack reject", "Breaker threshold"):
            assert raw not in page
        page = admin.post(
            "/endpoints/destinations/new/", {"kind": "dicomweb", "_refresh": "kind"}, **HX
        ).content.decode()
        assert re.search(r'<input type="password" name="secret"[^>]*autocomplete="new-password"', page)
        assert re.search(r'<input type="text" name="username"[^>]*autocomplete="off"', page)
        assert ">Authentication</label>" in page and ">Base URL</label>" in page
        for url in ("/endpoints/ae/new/", "/rules/new/"):
            page = admin.get(url).content.decode()
            assert "Ae title" not in page and "Tls" not in page and "Ai models" not in page
        assert ">AI models</label>" in admin.get("/rules/new/").content.decode()

    def test_an_hl7_destination_saves_from_its_own_fields(self, admin):
        data = {
            "name": "ris",
            "kind": "hl7",
            "enabled": "on",
            "host": "ris.hospital.local",
            "port": "2575",
            "hl7_message_type": "ORU^R01",
            "hl7_version": "2.5.1",
            "sending_application": "PACSLENS",
            "accession_field": "OBR-18",
            "on_ack_error": "fail",
            "on_ack_reject": "retry",
            **retry_defaults(),
        }
        assert admin.post("/endpoints/destinations/new/", data, **HX)["HX-Redirect"] == "/endpoints/"
        ris = Destination.objects.get()
        assert (ris.kind, ris.host, ris.port, ris.auth, ris.secret) == ("hl7", "ris.hospital.local", 2575, "none", "")

    def test_switching_to_a_kind_without_authentication_drops_the_secret(self, admin):
        web = Destination.objects.create(
            name="web", kind="dicomweb", base_url="https://pacs.example/dicom-web", auth="bearer", secret="token-1"
        )
        data = {"name": "web", "kind": "hl7", "host": "ris.local", "port": "2575", "hl7_message_type": "ORU^R01"}
        data.update({"hl7_version": "2.5.1", "accession_field": "OBR-18", "on_ack_error": "fail"})
        data.update({"on_ack_reject": "retry", **retry_defaults()})
        assert admin.post(f"/endpoints/destinations/{web.pk}/", data, **HX)["HX-Redirect"] == "/endpoints/"
        web.refresh_from_db()
        assert (web.kind, web.auth, web.secret) == ("hl7", "none", "")


class TestOneWordingPerError:
    @pytest.mark.parametrize("port", ["0", "-1", "70000"])
    def test_ports_read_the_same_in_both_forms_and_the_yaml(self, admin, port):
        page = admin.post("/endpoints/ae/new/", {"ae_title": "PACS", "host": "10.0.0.1", "port": port}, **HX)
        assert _errors(page, "port") == [PORT_MESSAGE]
        data = {"name": "ris", "kind": "hl7", "host": "ris.local", "port": port, "hl7_message_type": "ORU^R01"}
        page = admin.post("/endpoints/destinations/new/", {**data, **retry_defaults()}, **HX)
        assert _errors(page, "port") == [PORT_MESSAGE]
        problems = AE_TITLES.validate([{"ae_title": "PACS", "host": "10.0.0.1", "port": int(port)}])
        assert problems == [f"ae_titles[0] ('PACS'): field 'port': {PORT_MESSAGE}"]
        problems = DestinationsSection().validate([{**data, "port": int(port)}])
        assert problems == [f"destinations[0] ('ris'): field 'port': {PORT_MESSAGE}"]

    def test_names_read_the_same_in_the_forms_and_the_yaml(self, admin):
        page = admin.post("/endpoints/destinations/new/", {"name": "main pacs", "kind": "dicom"}, **HX)
        assert _errors(page, "name") == [NAME_MESSAGE]
        page = admin.post("/endpoints/poll-sources/new/", {"name": "night poll", "kind": "dimse"}, **HX)
        assert _errors(page, "name") == [NAME_MESSAGE]
        problems = DestinationsSection().validate([{"name": "main pacs", "kind": "hl7"}])
        assert f"destinations[0] ('main pacs'): field 'name': {NAME_MESSAGE}" in problems
        problems = PollSourcesSection().validate([{"name": "night poll", "kind": "dicomweb"}])
        assert any(p.endswith(f"field 'name': {NAME_MESSAGE}") for p in problems), problems
        assert "slug" not in " ".join(problems).lower()

    @pytest.mark.parametrize("host", ["bad host name!", "pacs..local", "-pacs", "10.1.2", "999.1.1.1", "a" * 64])
    def test_a_host_must_be_a_name_or_an_address(self, admin, host):
        page = admin.post("/endpoints/ae/new/", {"ae_title": "PACS", "host": host, "port": "104"}, **HX)
        assert _errors(page, "host") == [HOST_MESSAGE] and not ApplicationEntity.objects.exists()
        problems = AE_TITLES.validate([{"ae_title": "PACS", "host": host, "port": 104}])
        assert problems == [f"ae_titles[0] ('PACS'): field 'host': {HOST_MESSAGE}"]
        data = {"name": "ris", "kind": "hl7", "host": host, "port": "2575", "hl7_message_type": "ORU^R01"}
        page = admin.post("/endpoints/destinations/new/", {**data, **retry_defaults()}, **HX)
        assert _errors(page, "host") == [HOST_MESSAGE]

    @pytest.mark.parametrize("host", ["10.1.2.3", "fe80::1", "pacs", "pacs-01.hospital.local", "CT_SCANNER.local."])
    def test_host_names_and_addresses_are_accepted(self, admin, host):
        response = admin.post("/endpoints/ae/new/", {"ae_title": "PACS", "host": host, "port": "104"}, **HX)
        assert response["HX-Redirect"] == "/endpoints/"
        assert ApplicationEntity.objects.get().host == host


class TestUnusualAETitles:
    def test_a_space_or_lower_case_is_saved_with_a_warning(self, admin):
        response = admin.post(
            "/endpoints/ae/new/", {"ae_title": "ct scanner", "host": "10.0.0.1", "port": "104"}, follow=True
        )
        page = response.content.decode()
        assert ApplicationEntity.objects.get().ae_title == "ct scanner"
        assert 'class="msg warning"' in page and "has a space and lower-case letters: allowed, but unusual" in page

    def test_a_usual_title_gets_no_warning(self, admin):
        page = admin.post(
            "/endpoints/ae/new/", {"ae_title": "CT_SCANNER", "host": "10.0.0.1", "port": "104"}, follow=True
        ).content.decode()
        assert "unusual" not in page and "created" in page

    def test_the_site_yaml_warns_the_same_and_imports(self, tmp_path):
        from io import StringIO

        from django.core.management import call_command

        path = tmp_path / "site.yaml"
        path.write_text("pacslens_config: 1\nae_titles:\n- {ae_title: ct scanner, host: 10.0.0.1, port: 104}\n")
        err = StringIO()
        call_command("import_config", str(path), stdout=StringIO(), stderr=err)
        assert (
            "warning: ae_titles[0] ('ct scanner'): The AE title 'ct scanner' has a space and lower-case"
            in err.getvalue()
        )
        assert ApplicationEntity.objects.get().ae_title == "ct scanner"


class TestTestButtonMessages:
    def test_an_ae_title_with_a_host_but_no_port_is_told_it_lacks_the_port(self, admin):
        entity = ApplicationEntity.objects.create(ae_title="DEMO_MODALITY", host="127.0.0.1")
        page = admin.post(f"/endpoints/ae/{entity.pk}/test/", **HX).content.decode()
        assert "This AE title has no port: edit it to add one" in page and "host and port" not in page
        entity = ApplicationEntity.objects.create(ae_title="NOWHERE")
        assert "has no host and port" in admin.post(f"/endpoints/ae/{entity.pk}/test/", **HX).content.decode()

    def test_a_dicom_destination_names_what_its_pacs_lacks(self, admin):
        pacs = ApplicationEntity.objects.create(ae_title="PACS", host="10.0.0.9", may_send=False)
        destination = Destination.objects.create(name="pacs", kind="dicom", application_entity=pacs)
        page = admin.post(f"/endpoints/destinations/{destination.pk}/test/", **HX).content.decode()
        assert "That AE title has no port to send to" in page

    def test_without_javascript_the_test_button_leads_to_a_whole_page(self, admin):
        entity = ApplicationEntity.objects.create(ae_title="NOWHERE", host="127.0.0.1")
        page = admin.post(f"/endpoints/ae/{entity.pk}/test/").content.decode()
        assert page.startswith("<!DOCTYPE html>") and "Test of NOWHERE" in page and "no port" in page
        assert 'href="/endpoints/"' in page
        destination = make_destination(port=1)
        page = admin.post(f"/endpoints/destinations/{destination.pk}/test/").content.decode()
        assert page.startswith("<!DOCTYPE html>") and "Test of ris" in page


class TestAssessPage:
    def test_assess_is_its_own_page_not_a_cell_of_the_endpoints_table(self, admin):
        entity = ApplicationEntity.objects.create(ae_title="PACS", host="127.0.0.1", port=104)
        endpoints = admin.get("/endpoints/").content.decode()
        assert f'<a href="/endpoints/ae/{entity.pk}/assess/">Assess</a>' in endpoints
        assert "assessment" not in endpoints
        page = admin.get(f"/endpoints/ae/{entity.pk}/assess/").content.decode()
        assert "Integration assessment of PACS" in page and "Run the assessment" in page
        assert not AuditEntry.objects.filter(action="test").exists()  # nothing probed by opening it

    def test_a_node_without_an_address_is_told_so(self, admin):
        entity = ApplicationEntity.objects.create(ae_title="SENDER", host="10.0.0.1")
        page = admin.post(f"/endpoints/ae/{entity.pk}/assess/").content.decode()
        assert "has no port" in page and not AuditEntry.objects.filter(action="test").exists()


class TestDelete:
    def test_an_unused_ae_title_is_deleted_after_confirmation_and_audited(self, admin):
        entity = ApplicationEntity.objects.create(ae_title="OLD_CT", host="10.0.0.1", port=104)
        page = admin.get(f"/endpoints/ae/{entity.pk}/delete/").content.decode()
        assert "Delete AE title OLD_CT?" in page and ">Delete</button>" in page
        assert ApplicationEntity.objects.exists()  # the GET only asks
        response = admin.post(f"/endpoints/ae/{entity.pk}/delete/", follow=True)
        assert "AE title OLD_CT deleted." in response.content.decode()
        assert not ApplicationEntity.objects.exists()
        entry = AuditEntry.objects.get(action="delete")
        assert (entry.object_type, entry.object_id, entry.object_repr) == (
            "routing.applicationentity",
            str(entity.pk),
            "OLD_CT",
        )
        assert entry.before["host"] == "10.0.0.1" and entry.after is None

    def test_what_is_referenced_is_refused_with_the_reason(self, admin, pipeline):
        for url, reason in [
            (f"/endpoints/ae/{pipeline['entity'].pk}/delete/", None),
            (f"/endpoints/destinations/{pipeline['destination'].pk}/delete/", "routing rule(s) CT head send to it"),
            (f"/rules/{pipeline['rule'].pk}/delete/", "it sends results to destination(s) ris"),
        ]:
            if reason is None:  # the pipeline's modality is used by nothing: make a destination use it
                Destination.objects.create(name="pacs", kind="dicom", application_entity=pipeline["entity"])
                reason = "result destination(s) pacs send to it"
            page = admin.get(url).content.decode()
            assert "cannot be deleted: " + reason in page and ">Delete</button>" not in page
            response = admin.post(url)
            assert response.status_code == 409 and reason in response.content.decode()
        pipeline["destination"].rules.clear()
        page = admin.get(f"/endpoints/destinations/{pipeline['destination'].pk}/delete/").content.decode()
        assert "it holds 1 delivery (disable it instead)" in page
        assert not AuditEntry.objects.filter(action="delete").exists()
        assert Destination.objects.filter(name="ris").exists() and RoutingRule.objects.exists()

    def test_a_rule_and_a_destination_without_references_are_deleted(self, admin):
        rule = RoutingRule.objects.create(name="Old rule")
        rule.conditions.create(attribute="Modality", operator="one_of", value="CT\\MR")
        destination = make_destination(name="old-ris")
        assert admin.post(f"/rules/{rule.pk}/delete/", **HX)["HX-Redirect"] == "/rules/"
        assert admin.post(f"/endpoints/destinations/{destination.pk}/delete/", **HX)["HX-Redirect"] == "/endpoints/"
        assert not RoutingRule.objects.exists() and not Destination.objects.exists()
        rule_entry = AuditEntry.objects.get(action="delete", object_type="routing.routingrule")
        assert rule_entry.before["conditions"] == ["Modality is one of 'CT\\MR'"]
        assert AuditEntry.objects.filter(action="delete", object_repr="old-ris (HL7 v2 over MLLP)").exists()

    def test_the_lists_offer_delete_to_who_may_delete(self, admin, client, users, pipeline):
        assert f"/endpoints/ae/{pipeline['entity'].pk}/delete/" in admin.get("/endpoints/").content.decode()
        assert f"/rules/{pipeline['rule'].pk}/delete/" in admin.get("/rules/").content.decode()
        client.force_login(users["informaticist"])
        assert client.post(f"/rules/{pipeline['rule'].pk}/delete/").status_code == 403
        assert client.get(f"/endpoints/ae/{pipeline['entity'].pk}/delete/").status_code == 403


class TestStudiesAndDryRun:
    def test_search_finds_an_accession_by_its_start(self, admin, pipeline):
        page = admin.get("/studies/", {"q": "acc1"}, **HX).content.decode()
        assert "ACC100" in page and "ACC200" not in page
        page = admin.get("/studies/", {"q": "ACC"}, **HX).content.decode()
        assert "ACC100" in page and "ACC200" in page

    def test_the_finding_column_says_not_flagged(self, admin):
        make_result(make_study(accession="LOW1"), score=0.1)
        make_study(accession="NONE1")
        page = admin.get("/studies/", **HX).content.decode()
        rows = {row.split("</a>")[0].rsplit(">", 1)[-1]: row for row in page.split("<tr>")[2:]}
        low = next(row for row in page.split("<tr>") if "LOW1" in row)
        none = next(row for row in page.split("<tr>") if "NONE1" in row)
        assert "not flagged" in low and "not flagged" not in none and "No result yet" in none
        assert rows

    def test_dry_run_by_accession_or_study_uid_linked_from_the_study(self, admin, pipeline):
        done = pipeline["done"]
        detail = admin.get(f"/studies/{done.pk}/").content.decode()
        assert f'href="/rules/dry-run/?study={done.study_instance_uid}"' in detail
        for reference in ("ACC100", done.study_instance_uid, str(done.pk)):
            page = admin.get("/rules/dry-run/", {"study": reference}, **HX).content.decode()
            assert f'href="/studies/{done.pk}/"' in page and f'href="/studies/{pipeline["failed"].pk}/"' not in page
        for unknown in ("NOPE", "1.2.3.4", "999999", "x" * 80):
            page = admin.get("/rules/dry-run/", {"study": unknown}, **HX).content.decode()
            assert re.findall(r'role="alert">([^<]*)<', page) == [
                "No study has this accession number, Study UID or id."
            ]


class TestFavicon:
    def test_every_page_names_a_local_favicon(self, admin, settings):
        page = admin.get("/endpoints/").content.decode()
        assert '<link rel="icon" href="/static/ui/favicon.svg" type="image/svg+xml">' in page
        from django.contrib.staticfiles import finders

        assert finders.find("ui/favicon.svg")


def _errors(response, field: str) -> list[str]:
    page = response.content.decode()
    block = re.search(rf'<ul class="errorlist" id="id_{field}-errors">(.*?)</ul>', page, re.S)
    assert block, f"no error list for {field}"
    return [re.sub(r"&#x27;", "'", e) for e in re.findall(r"<li>(.*?)</li>", block.group(1))]
