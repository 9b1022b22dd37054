"""One version (pacslens/__init__.py) everywhere it is shown: `manage.py about`, the UI footer,
/healthz, the SR's Software Versions, the CHANGELOG. And the first-run page for a host name that
is not allowed, instead of a bare 400."""

from __future__ import annotations

import io
import json
import uuid

import pytest
from django.core.management import call_command
from django.test import Client

from pacslens import __version__
from results.deliver.sr import build_sr
from results.models import Installation
from tests.support.ct import make_ct_slices
from tests.support.listener_proc import REPO
from tests.support.sr import make_payload

pytestmark = pytest.mark.django_db


def test_the_version_is_a_release_number():
    major, minor, patch = (int(part) for part in __version__.split("."))
    assert (major, minor, patch) >= (0, 2, 0)


def test_about_prints_version_identity_database_and_data_dir(data_dir):
    out = io.StringIO()
    call_command("about", "--json", stdout=out)
    about = json.loads(out.getvalue())

    assert about["version"] == __version__
    assert uuid.UUID(about["installation"]) == Installation.objects.get().uuid
    assert about["database"].startswith("sqlite ") and about["data_dir"] == str(data_dir)

    text = io.StringIO()
    call_command("about", stdout=text)
    assert f"version            {__version__}" in text.getvalue()
    assert "password" not in text.getvalue().lower()


@pytest.mark.usefixtures("plain_static_storage")
def test_the_footer_and_healthz_show_it(admin, data_dir):
    page = admin.get("/").content.decode()
    assert f'<footer class="footer small">PacsLens {__version__}</footer>' in page
    assert Client().get("/healthz").json()["version"] == __version__


def test_the_sr_names_it_in_software_versions():
    sr = build_sr(make_payload(make_ct_slices(1)))
    assert sr.SoftwareVersions == __version__


def test_the_changelog_starts_with_it():
    changelog = (REPO / "CHANGELOG.md").read_text()
    first = next(line for line in changelog.splitlines() if line.startswith("## "))
    assert first.startswith(f"## {__version__} ")
    assert "### Upgrade notes" in changelog


@pytest.mark.usefixtures("plain_static_storage")
class TestHostNotAllowed:
    def test_the_page_names_the_setting_and_the_host(self, client):
        response = client.get("/", HTTP_HOST="pacslens.hospital.example:8000")

        assert response.status_code == 400
        page = response.content.decode()
        assert "PACSLENS_ALLOWED_HOSTS=localhost,127.0.0.1,pacslens.hospital.example make run" in page
        assert "<code>pacslens.hospital.example:8000</code>" in page

    def test_a_hostile_host_header_is_escaped(self, client):
        response = client.get("/", HTTP_HOST="<script>alert(1)</script>")

        assert response.status_code == 400
        assert b"<script>alert" not in response.content and b"&lt;script&gt;" in response.content

    def test_other_bad_requests_keep_djangos_page(self, client, settings):
        # A request Django refuses for another reason (here: too many form fields).
        settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 1
        response = client.post("/login/", {"a": "1", "b": "2"})
        assert response.status_code == 400 and b"PACSLENS_ALLOWED_HOSTS" not in response.content
