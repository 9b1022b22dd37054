"""The `ae_titles` section: DICOM peers (senders, result receivers, query targets).

ae_titles:
- {ae_title: CT01, host: 10.1.2.3, port: 104, may_send: true, receives_results: false}
"""

from __future__ import annotations

from typing import Any

from pacslens.site_config.checks import ModelSection
from routing.models import ApplicationEntity
from routing.validators import ae_title_warning

AE_TITLES = ModelSection(
    name="ae_titles",
    model=ApplicationEntity,
    key="ae_title",
    fields=ApplicationEntity.CONFIG_FIELDS,
)


def ae_title_warnings(entries: list[Any]) -> list[str]:
    """What the staff form warns about (a space, lower case), for the entries of the file: allowed, so not problems."""
    warnings = []
    for index, entry in enumerate(entries):
        if isinstance(entry, dict) and isinstance(entry.get("ae_title"), str):
            warning = ae_title_warning(entry["ae_title"])
            if warning:
                warnings.append(f"ae_titles[{index}] ({entry['ae_title']!r}): {warning}")
    return warnings
