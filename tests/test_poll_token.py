"""A DICOMweb poll source's token variable: only PACSLENS_POLL_TOKEN_* can be named, so neither
the Test button nor a poll can send DATABASE_URL or the secret key to a server of the editor's choice."""

from __future__ import annotations

import datetime

import pytest

from routing.models import AuditEntry, PollSource
from routing.pull.dicomweb import query_studies
from routing.pull.types import PullError

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("plain_static_storage")]
HX = {"HTTP_HX_REQUEST": "true"}


def _form(url: str, token_env: str) -> dict:
    return {
        "name": "vna",
        "kind": "dicomweb",
        "enabled": "on",
        "retrieve_mode": "c-move",
        "dicomweb_url": url,
        "dicomweb_token_env": token_env,
        "interval_seconds": "60",
        "lookback_hours": "24",
        "max_studies_per_poll": "10",
        "max_concurrent_retrieves": "1",
        "min_query_spacing_seconds": "5",
    }


class TestPollTokenVariable:
    def test_the_form_refuses_any_other_variable_inline(self, admin):
        page = admin.post("/endpoints/poll-sources/new/", _form("https://vna.example/dicom-web", "DATABASE_URL"), **HX)
        text = page.content.decode()
        assert 'id="id_dicomweb_token_env-errors"' in text and "PACSLENS_POLL_TOKEN_" in text
        assert not PollSource.objects.exists()

    def test_the_form_accepts_the_prefix(self, admin):
        data = _form("https://vna.example/dicom-web", "PACSLENS_POLL_TOKEN_VNA")
        assert admin.post("/endpoints/poll-sources/new/", data, **HX)["HX-Redirect"] == "/endpoints/"
        assert PollSource.objects.get().dicomweb_token_env == "PACSLENS_POLL_TOKEN_VNA"

    def test_the_test_button_sends_a_prefixed_token(self, admin, recorder, monkeypatch):
        monkeypatch.setenv("PACSLENS_POLL_TOKEN_VNA", "poll-token")
        source = PollSource.objects.create(
            name="vna", kind="dicomweb", dicomweb_url=recorder.url, dicomweb_token_env="PACSLENS_POLL_TOKEN_VNA"
        )
        admin.post(f"/endpoints/poll-sources/{source.pk}/test/", **HX)
        assert recorder.authorizations() == ["Bearer poll-token"]

    def test_a_stored_foreign_variable_is_never_sent(self, admin, recorder, monkeypatch):
        # A row from before the rule (or written around the form) names another variable.
        monkeypatch.setenv("PACSLENS_SECRET_KEY_FOR_TEST", "the-secret-key")
        source = PollSource.objects.create(
            name="vna", kind="dicomweb", dicomweb_url=recorder.url, dicomweb_token_env="PACSLENS_SECRET_KEY_FOR_TEST"
        )
        page = admin.post(f"/endpoints/poll-sources/{source.pk}/test/", **HX).content.decode()
        assert "refused" in page and "the-secret-key" not in page
        assert recorder.headers == []
        assert "the-secret-key" not in AuditEntry.objects.get(action="test").detail

    def test_a_poll_refuses_a_foreign_variable_before_any_request(self, recorder, monkeypatch):
        monkeypatch.setenv("PACSLENS_SECRET_KEY_FOR_TEST", "the-secret-key")
        source = PollSource(
            kind="dicomweb", dicomweb_url=recorder.url, dicomweb_token_env="PACSLENS_SECRET_KEY_FOR_TEST"
        )
        with pytest.raises(PullError) as caught:
            query_studies(source, date_from=datetime.date(2026, 1, 1), date_to=None, modalities=[])
        assert caught.value.permanent and "the-secret-key" not in str(caught.value)
        assert recorder.headers == []
