"""Template context every page gets."""

from __future__ import annotations

from django.http import HttpRequest

from pacslens import __version__


def version(request: HttpRequest) -> dict[str, str]:
    """The running version, for the footer (which release a screenshot or a ticket is about)."""
    return {"pacslens_version": __version__}
