"""Validation helpers shared by every section of the site YAML (routing.config_yaml)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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

