"""Operational configuration as one YAML file: `export_config` / `import_config`.

Each section maps a top-level YAML key to a kind of configuration row, one module per section
in this package; SECTIONS below is their one ordered list (a section comes after the ones it
refers to). Import validates every entry of every section first and changes nothing if any is
wrong, naming the section, the entry and the field. Secrets are never exported in clear.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml
from django.db import transaction

from pacslens.site_config.ae_titles import AE_TITLES, ae_title_warnings
from pacslens.site_config.ai_models import ModelsSection
from pacslens.site_config.alerts import AlertChannelsSection, AlertRulesSection
from pacslens.site_config.coding_profiles import CodingProfilesSection
from pacslens.site_config.destinations import DestinationsSection
from pacslens.site_config.poll_sources import PollSourcesSection
from pacslens.site_config.routing_rules import RoutingRulesSection

FORMAT_VERSION = 1


class ConfigError(Exception):
    """Every problem found in a configuration file, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


# In order: a section comes after every section it refers to.
SECTIONS: list[Any] = [
    AE_TITLES,
    PollSourcesSection(),  # names AE titles
    ModelsSection(),
    RoutingRulesSection(),  # names models
    DestinationsSection(),  # names AE titles and routing rules
    AlertChannelsSection(),
    AlertRulesSection(),
    CodingProfilesSection(),  # names destinations
]


def config_export() -> str:
    document: dict[str, Any] = {"pacslens_config": FORMAT_VERSION}
    for section in SECTIONS:
        document[section.name] = section.export()
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def config_import(text: str, *, prune: bool = False, dry_run: bool = False) -> dict[str, dict[str, int]]:
    """Validate the whole file, then apply it in one transaction. Raises ConfigError, changing nothing."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"]) from None
    if not isinstance(document, dict):
        raise ConfigError(["the file must be a YAML mapping with one key per section"])
    problems = _check_document(document)
    sections = [s for s in SECTIONS if s.name in document]
    for section in sections:
        entries = document[section.name]
        if entries is None:
            document[section.name] = entries = []
        if not isinstance(entries, list):
            problems.append(f"{section.name}: must be a list")
            continue
        if getattr(section, "needs_document", False):  # it checks references into other sections
            problems.extend(section.validate(entries, document=document))
        else:
            problems.extend(section.validate(entries))
    if problems:
        raise ConfigError(problems)
    summary: dict[str, dict[str, int]] = {}
    with transaction.atomic():
        for section in sections:
            summary[section.name] = section.apply(document[section.name], prune=prune)
        if dry_run:
            transaction.set_rollback(True)
    return summary


def config_warnings(text: str) -> list[str]:
    """What is allowed but probably a slip (unusual AE titles); the import goes ahead."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError:
        return []  # config_import says why
    entries = document.get(AE_TITLES.name) if isinstance(document, dict) else None
    return ae_title_warnings(entries) if isinstance(entries, list) else []


def _check_document(document: dict[str, Any]) -> list[str]:
    problems = []
    version = document.get("pacslens_config")
    if version != FORMAT_VERSION:
        problems.append(f"pacslens_config: expected format version {FORMAT_VERSION}, found {version!r}")
    known = {s.name for s in SECTIONS} | {"pacslens_config"}
    unknown: Iterable[str] = sorted(set(document) - known)
    for name in unknown:
        problems.append(f"{name}: unknown section; known sections: {', '.join(sorted(known - {'pacslens_config'}))}")
    return problems
