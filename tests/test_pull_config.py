"""Poll sources in the site YAML, and the scheduled poll loop."""

from __future__ import annotations

import pytest
import yaml

from pacslens.site_config.document import ConfigError, config_export, config_import
from routing.models import ApplicationEntity, PollSource
from routing.pull.poll import poll_due_sources

pytestmark = pytest.mark.django_db

SITE = """
pacslens_config: 1
ae_titles:
- {ae_title: PACS1, host: pacs.example, port: 104, may_query: true, may_send: true}
poll_sources:
- name: main-pacs
  pacs: PACS1
  retrieve_mode: c-get
  modalities: CT\\\\MR
  interval_seconds: 30
  extra_filters: {StudyDescription: "*HEAD*"}
- name: vna-web
  kind: dicomweb
  dicomweb_url: https://vna.example/dicom-web
  dicomweb_token_env: PACSLENS_POLL_TOKEN_VNA
"""


class TestPollSourcesSection:
    def test_import_then_export_round_trips_without_state_or_secrets(self):
        config_import(SITE)
        source = PollSource.objects.get(name="main-pacs")
        assert (source.pacs.ae_title, source.retrieve_mode, source.modality_list) == ("PACS1", "c-get", ["CT", "MR"])
        PollSource.objects.filter(pk=source.pk).update(consecutive_failures=3, leased_by="worker")

        exported = yaml.safe_load(config_export())

        entries = {e["name"]: e for e in exported["poll_sources"]}
        assert entries["main-pacs"]["pacs"] == "PACS1"
        assert entries["main-pacs"]["extra_filters"] == {"StudyDescription": "*HEAD*"}
        assert entries["vna-web"]["dicomweb_token_env"] == "PACSLENS_POLL_TOKEN_VNA"
        assert not {"consecutive_failures", "leased_by", "watermark"} & set(entries["main-pacs"])
        config_import(config_export())  # an export re-imports unchanged
        assert PollSource.objects.count() == 2

    def test_problems_are_named_and_nothing_changes(self):
        bad = SITE.replace("may_query: true", "may_query: false").replace("StudyDescription", "NoSuchKeyword")
        with pytest.raises(ConfigError) as caught:
            config_import(bad)
        text = str(caught.value)
        assert "poll_sources[0] ('main-pacs'): field 'pacs': PACS1 is not marked 'may query'" in text
        assert "NoSuchKeyword" in text
        assert not PollSource.objects.exists() and not ApplicationEntity.objects.exists()

    def test_unknown_pacs_is_refused(self):
        with pytest.raises(ConfigError, match="no AE title 'NOPE'"):
            config_import(SITE.replace("pacs: PACS1", "pacs: NOPE"))


class TestScheduledLoop:
    def test_returns_at_once_without_fast_sources(self, transactional_db):
        # No source polls faster than the scheduler wakes: one pass, no sleeping loop.
        assert poll_due_sources(sweep_seconds=30) == 0
