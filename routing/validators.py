"""Validators for peer-facing identifiers. Pure functions: settings imports them too."""

from __future__ import annotations

from django.core.exceptions import ValidationError


def ae_title_problem(value: str) -> str | None:
    """Why `value` is not a valid AE title (PS3.5 6.2, VR AE), or None if it is."""
    if not value or not value.strip(" "):
        return "an AE title cannot be empty or all spaces"
    if len(value) > 16:
        return f"an AE title has at most 16 characters, this one has {len(value)}"
    if "\\" in value:
        return "an AE title cannot contain a backslash"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        return "an AE title cannot contain control characters"
    if any(ord(ch) > 0x7E for ch in value):
        return "an AE title uses the default character repertoire (plain ASCII) only"
    return None


def validate_ae_title(value: str) -> None:
    problem = ae_title_problem(value)
    if problem:
        raise ValidationError(problem, code="invalid_ae_title")
