"""Validators for peer-facing identifiers. Pure functions: settings imports them too."""

from __future__ import annotations

import ipaddress
import re

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


# One wording per error, wherever the value is entered: staff forms, the site YAML, the models.
PORT_MESSAGE = "A TCP port is between 1 and 65535."
NAME_MESSAGE = "A name uses only letters, digits, hyphens and underscores (no spaces), e.g. main-pacs."
HOST_MESSAGE = "Enter a host name (letters, digits, hyphens, dots: e.g. pacs.hospital.local) or an IP address."

# RFC 1123 labels; underscores too, which Windows-managed hospital DNS zones do contain.
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def host_problem(value: str) -> str | None:
    """Why `value` is neither a host name nor an IP address, or None if it is one."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return None
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253 or not all(_HOST_LABEL.match(label) for label in name.split(".")):
        return HOST_MESSAGE
    if name.replace(".", "").isdigit():  # 10.1.2 or 999.1.1.1: a mistyped IPv4 address, not a name
        return HOST_MESSAGE
    return None


def validate_host(value: str) -> None:
    if host_problem(value):
        raise ValidationError(HOST_MESSAGE, code="invalid_host")


def ae_title_warning(value: str) -> str | None:
    """What is unusual (but allowed by PS3.5) about an AE title: most PACS configure upper-case
    titles without spaces, and a peer compares them exactly, so these are likely typing slips."""
    unusual = []
    if " " in value.strip(" "):
        unusual.append("a space")
    if any(ch.islower() for ch in value):
        unusual.append("lower-case letters")
    if not unusual:
        return None
    return (
        f"The AE title {value.strip()!r} has {' and '.join(unusual)}: allowed, but unusual. Peers compare AE titles "
        "exactly, so check it is written the same way in the other system's configuration."
    )
