"""What every section of the site YAML shares: entry labels, model validation as problems, and
`ModelSection` for a section whose entries are rows of one model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ValidationError
from django.db import models


def entries_labelled(
    section: str, entries: list[Any], problems: list[str], *, key: Callable[[dict], Any], what: str = "name"
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each mapping entry with its label for messages (`section[2] ('CT01')`); non-mappings and
    duplicate keys are recorded in `problems`. Every section validates through this."""
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{section}[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping of field: value")
            continue
        value = key(entry)
        shown = " ".join(repr(part) for part in value) if isinstance(value, tuple) else repr(value)
        label = f"{where} ({shown})" if value is not None else where
        if value is not None:
            if repr(value) in seen:
                problems.append(f"{label}: {what} appears twice in the file")
            seen.add(repr(value))
        yield label, entry


def clean_problems(row: models.Model, label: str, *, exclude: list[str] | None = None) -> list[str]:
    """The model's own validation of `row`, as one message per field problem; fields in
    `exclude` are left out (including what the model's clean() says about them)."""
    exclude = exclude or []
    try:
        row.full_clean(exclude=exclude, validate_unique=False, validate_constraints=False)
    except ValidationError as exc:
        return [
            f"{label}: field {name!r}: {message}"
            for name, messages in exc.message_dict.items()
            if name not in exclude
            for message in messages
        ]
    return []


@dataclass
class ModelSection:
    """A section whose entries are rows of one model, identified by a natural key field."""

    name: str
    model: type[models.Model]
    key: str
    fields: list[str]
    defaults: dict[str, Any] = field(default_factory=dict)

    def export(self) -> list[dict[str, Any]]:
        return [{f: getattr(row, f) for f in self.fields} for row in self.model._default_manager.order_by(self.key)]

    def validate(self, entries: list[Any]) -> list[str]:
        problems: list[str] = []
        for label, entry in entries_labelled(
            self.name, entries, problems, key=lambda e: e.get(self.key), what=self.key
        ):
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
            _, was_created = self.model._default_manager.update_or_create(
                **{self.key: getattr(row, self.key)}, defaults=values
            )
            created += was_created
            updated += not was_created
            keys.append(getattr(row, self.key))
        deleted = 0
        if prune:
            deleted, _ = self.model._default_manager.exclude(**{f"{self.key}__in": keys}).delete()
        return {"created": created, "updated": updated, "deleted": deleted}

    def _row(self, entry: dict[str, Any]) -> models.Model:
        existing = self.model._default_manager.filter(**{self.key: entry.get(self.key)}).first()
        row = existing or self.model(**self.defaults)
        for name, value in entry.items():
            setattr(row, name, value)
        return row
