"""The `alert_channels` and `alert_rules` sections of the site YAML.

    alert_channels:
    - name: it-team
      kind: email                   # email | webhook
      enabled: true
      email_to: it@hospital.example, pacs-admin@hospital.example
      webhook_format: generic
    - name: teams
      kind: webhook
      webhook_format: teams         # generic | teams | slack
      # webhook_url: https://...    # import only: a webhook URL is a credential, never exported
    alert_rules:
    - name: failure-queue
      condition: failure_queue      # failure_queue | circuit_open | pull_failed | disk_low | heartbeat_missing
    - name: ct1-silent
      condition: sender_silent
      ae_title: CT1
      hours: 4
      weekdays: mon,tue,wed,thu,fri
      active_from: '07:00'
      active_to: '19:00'
    - name: bleed-flag-share
      condition: flag_share
      model_name: demo-hyperdense-head-ct
      min_share_percent: 2
      max_share_percent: 30
      window_hours: 24
      min_results: 20

A channel entry without `webhook_url` keeps the stored one, so an exported file re-imports
without losing it. Fields a condition does not use are exported with their defaults.
"""

from __future__ import annotations

from datetime import time
from typing import Any

from pacslens.site_config.checks import ModelSection
from results.models import AlertChannel, AlertRule

IMPORT_ONLY = "webhook_url"


class AlertChannelsSection(ModelSection):
    def __init__(self) -> None:
        # The URL is a field on import (given or kept, it is saved) but never written to a file.
        fields = [*AlertChannel.CONFIG_FIELDS, IMPORT_ONLY]
        super().__init__(name="alert_channels", model=AlertChannel, key="name", fields=fields)

    def export(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in entry.items() if k != IMPORT_ONLY} for entry in super().export()]


class AlertRulesSection(ModelSection):
    def __init__(self) -> None:
        super().__init__(name="alert_rules", model=AlertRule, key="name", fields=AlertRule.CONFIG_FIELDS)

    def export(self) -> list[dict[str, Any]]:
        entries = super().export()
        for entry in entries:
            for name, value in entry.items():
                if isinstance(value, time):  # YAML has no time type: "HH:MM", as the form takes it
                    entry[name] = f"{value:%H:%M}"
        return entries
