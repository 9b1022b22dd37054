"""The `ae_titles` section: DICOM peers (senders, result receivers, query targets).

ae_titles:
- {ae_title: CT01, host: 10.1.2.3, port: 104, may_send: true, receives_results: false}
"""

from __future__ import annotations

from pacslens.site_config.checks import ModelSection
from routing.models import ApplicationEntity

AE_TITLES = ModelSection(
    name="ae_titles",
    model=ApplicationEntity,
    key="ae_title",
    fields=ApplicationEntity.CONFIG_FIELDS,
)
