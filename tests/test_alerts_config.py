"""Alert channels and rules in the site YAML: round trip, named errors, the webhook URL import-only."""

from __future__ import annotations

from datetime import time

import pytest
import yaml

from pacslens.site_config.document import ConfigError, config_export, config_import
from results.models import AlertChannel, AlertRule

pytestmark = pytest.mark.django_db

FILE = """
pacslens_config: 1
alert_channels:
- name: it-team
  kind: email
  email_to: it@hospital.example, pacs@hospital.example
- name: teams
  kind: webhook
  webhook_format: teams
  webhook_url: https://hospital.webhook.office.com/workflows/abc/secret
alert_rules:
- name: ct1-silent
  condition: sender_silent
  ae_title: CT1
  hours: 4
  weekdays: mon,tue,wed,thu,fri
  active_from: '07:00'
  active_to: '19:00'
- name: bleed-band
  condition: flag_share
  model_name: demo-hyperdense-head-ct
  min_share_percent: 2
  max_share_percent: 30
"""


def test_import_then_export_round_trips_without_the_webhook_url():
    config_import(FILE)
    teams = AlertChannel.objects.get(name="teams")
    assert teams.webhook_url.endswith("/secret") and teams.webhook_format == "teams"
    silent = AlertRule.objects.get(name="ct1-silent")
    assert (silent.active_from, silent.active_to, silent.hours) == (time(7), time(19), 4.0)
    exported = config_export()
    assert "secret" not in exported and "webhook_url" not in exported
    document = yaml.safe_load(exported)
    rules = {entry["name"]: entry for entry in document["alert_rules"]}
    assert (rules["ct1-silent"]["active_from"], rules["ct1-silent"]["weekdays"]) == ("07:00", "mon,tue,wed,thu,fri")
    config_import(exported)  # a file without the URL keeps the stored one
    assert AlertChannel.objects.get(name="teams").webhook_url.endswith("/secret")
    assert config_export() == exported


def test_errors_name_the_entry_and_field_and_change_nothing():
    bad = FILE.replace("email_to: it@hospital.example, pacs@hospital.example", "email_to: not-an-address").replace(
        "max_share_percent: 30", "max_share_percent: 1"
    )
    with pytest.raises(ConfigError) as error:
        config_import(bad)
    assert "alert_channels[0] ('it-team'): field 'email_to': 'not-an-address' is not an e-mail address" in (
        error.value.problems
    )
    assert "alert_rules[1] ('bleed-band'): field 'max_share_percent': Must be at least the minimum share." in (
        error.value.problems
    )
    assert not AlertChannel.objects.exists() and not AlertRule.objects.filter(name="ct1-silent").exists()


def test_prune_removes_rules_missing_from_the_file():
    config_import(FILE, prune=True)
    assert sorted(AlertRule.objects.values_list("name", flat=True)) == ["bleed-band", "ct1-silent"]
