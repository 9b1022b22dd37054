"""Operational configuration as one YAML file: `export_config` / `import_config`.

Each section maps a top-level YAML key to a kind of configuration row. Import validates every
entry of every section first and changes nothing if any is wrong, naming the section, the
entry and the field. Sections register themselves in SECTIONS; other apps append theirs.
Secrets are never exported in clear (a section exports a reference such as `token_env`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml
from django.db import models, transaction

from routing.config_checks import clean_problems, entries_labelled
from routing.config_pull import PollSourcesSection
from routing.models import ApplicationEntity

FORMAT_VERSION = 1


class ConfigError(Exception):
    """Every problem found in a configuration file, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class ModelSection:
    """A section whose entries are rows of one model, identified by a natural key field."""

    name: str
    model: type[models.Model]
    key: str
    fields: list[str]
    defaults: dict[str, Any] = field(default_factory=dict)

    def export(self) -> list[dict[str, Any]]:
        return [{f: getattr(row, f) for f in self.fields} for row in self.model.objects.order_by(self.key)]

    def validate(self, entries: list[Any]) -> list[str]:
        problems: list[str] = []
        for label, entry in entries_labelled(self.name, entries, problems, key=lambda e: e.get(self.key), what=self.key):
            unknown = sorted(set(entry) - set(self.fields))
            if unknown:
                problems.append(f"{label}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(self.fields)}")
                continue
            if self.key not in entry:
                problems.append(f"{label}: field {self.key!r} is required")
                continue
            problems.extend(clean_problems(self._row(entry), label))
        return problems

    def apply(self, entries: list[dict[str, Any]], *, prune: bool) -> dict[str, int]:
        created = updated = 0
        keys = []
        for entry in entries:
            row = self._row(entry)
            row.full_clean(validate_unique=False, validate_constraints=False)  # normalises values
            values = {f: getattr(row, f) for f in self.fields if f != self.key}
            _, was_created = self.model.objects.update_or_create(**{self.key: getattr(row, self.key)}, defaults=values)
            created += was_created
            updated += not was_created
            keys.append(getattr(row, self.key))
        deleted = 0
        if prune:
            deleted, _ = self.model.objects.exclude(**{f"{self.key}__in": keys}).delete()
        return {"created": created, "updated": updated, "deleted": deleted}

    def _row(self, entry: dict[str, Any]) -> models.Model:
        existing = self.model.objects.filter(**{self.key: entry.get(self.key)}).first()
        row = existing or self.model(**self.defaults)
        for name, value in entry.items():
            setattr(row, name, value)
        return row


SECTIONS: list[Any] = [
    ModelSection(
        name="ae_titles",
        model=ApplicationEntity,
        key="ae_title",
        fields=[
            "ae_title",
            "host",
            "port",
            "description",
            "enabled",
            "may_send",
            "check_peer_ip",
            "receives_results",
            "may_query",
            "tls",
            "quiet_period_seconds",
        ],
    ),
    PollSourcesSection(),  # after the AE titles it refers to
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
