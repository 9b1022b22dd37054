"""manage.py conformance_statement and /conformance: generated from the running configuration."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client
from pynetdicom.presentation import AllStoragePresentationContexts

from results.models import Destination
from routing.models import ApplicationEntity
from routing.receive.listener import TRANSFER_SYNTAXES

pytestmark = pytest.mark.django_db


def statement(*args: str) -> str:
    out = StringIO()
    call_command("conformance_statement", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def site(settings):
    settings.AE_TITLE = "AI_GATEWAY"
    settings.DICOM_PORT = 10400
    settings.DICOM_LISTENER_PROCESSES = 3
    settings.DICOM_MAX_ASSOCIATIONS = 7
    ApplicationEntity.objects.create(
        ae_title="MAIN_PACS",
        host="pacs.hospital.local",
        port=104,
        may_send=True,
        check_peer_ip=True,
        receives_results=True,
        tls=True,
    )
    ApplicationEntity.objects.create(ae_title="OLD_CT", host="ct1", may_send=False)
    Destination.objects.create(
        name="main-pacs", kind="dicom", application_entity=ApplicationEntity.objects.get(ae_title="MAIN_PACS")
    )


class TestMarkdown:
    def test_it_describes_this_installation(self, site):
        text = statement()
        assert text.startswith("# PacsLens DICOM Conformance Statement — AE AI_GATEWAY")
        assert "| AE title | AI_GATEWAY |" in text
        assert "0.0.0.0:10400" in text or ":10400 (TCP)" in text
        assert "7 per process, 21 in all" in text
        assert "| MAIN_PACS | pacs.hospital.local | yes |" in text  # on the allow-list, peer address checked
        assert "OLD_CT" not in text  # not allowed to send
        assert "| main-pacs | MAIN_PACS | pacs.hospital.local:104 | yes |" in text
        assert "Outbound TLS is used per remote AE title: MAIN_PACS." in text

    def test_every_accepted_sop_class_and_transfer_syntax_is_listed(self, site):
        text = statement()
        for uid in TRANSFER_SYNTAXES:
            assert f"| {uid} |" in text
        for context in AllStoragePresentationContexts:
            assert f"| {context.abstract_syntax} |" in text

    def test_roles_sr_template_and_character_sets(self, site):
        text = statement()
        assert "| Study Root Query/Retrieve — MOVE | 1.2.840.10008.5.1.4.1.2.2.2 | Yes | No |" in text
        assert "1.2.840.10008.5.1.4.1.1.88.34" in text  # Comprehensive 3D SR proposed as SCU
        assert "TID 1500 Measurement Report" in text and "99PACSLENS" in text
        assert "## 11. Character sets" in text
        assert "calling AE title not recognised" in text and "local limit exceeded" in text


class TestHtml:
    def test_html_format_is_escaped(self, site, tmp_path):
        ApplicationEntity.objects.filter(ae_title="MAIN_PACS").update(description="<script>x</script>")
        target = tmp_path / "cs.html"
        statement("--format", "html", "--output", str(target))
        html = target.read_text()
        assert html.startswith("<!DOCTYPE html>")
        assert "&lt;script&gt;x&lt;/script&gt;" in html and "<script>" not in html

    def test_the_ui_url_needs_a_login(self, site):
        client = Client(HTTP_HOST="localhost")
        response = client.get("/conformance")
        assert response.status_code == 302
        user = User.objects.create_user("informaticist", password="a long enough password 1")
        client.force_login(user)
        response = client.get("/conformance")
        assert response.status_code == 200
        assert b"AI_GATEWAY" in response.content
