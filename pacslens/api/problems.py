"""Errors as RFC 9457 problem details (`application/problem+json`).

Every error the API answers has `type`, `title`, `status`, `detail` and `instance`; a validation
error also names each field at fault in `errors` ([{"field", "detail"}], and `field` for the
first), with the same messages the UI shows beside its form fields.
"""

from __future__ import annotations

import json
import re
from typing import Any

from django.http import HttpRequest, HttpResponse

PROBLEM_TYPE = "about:blank"
CONTENT_TYPE = "application/problem+json"
TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    412: "Precondition Failed",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    428: "Precondition Required",
}
# The site YAML's problem texts name their field as "field 'name': message" (pacslens/site_config).
_FIELD_MESSAGE = re.compile(r"field '(?P<field>[^']+)': (?P<detail>.*)", re.DOTALL)


class Problem(Exception):
    """Raise to answer with a problem; `errors` are (field, message) pairs."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors or []
        self.headers = headers or {}


def problem_response(
    request: HttpRequest,
    status: int,
    detail: str,
    *,
    errors: list[tuple[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> HttpResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE,
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "instance": request.path,
    }
    if errors:
        body["field"] = errors[0][0]
        body["errors"] = [{"field": field, "detail": message} for field, message in errors]
    response = HttpResponse(json.dumps(body), status=status, content_type=CONTENT_TYPE)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def config_problems(problems: list[str], *, label: str) -> list[tuple[str, str]]:
    """The site YAML's problem texts about one entry as (field, message) pairs, without the
    entry's label (`ae_titles[0] ('CT01'): `) that only means something in a file."""
    pairs = []
    for text in problems:
        if text.startswith(label):
            text = text[len(label) :].lstrip(": ")
        else:
            text = re.sub(r"^\w+\[\d+\](?: \(.*?\))?: ", "", text)
        match = _FIELD_MESSAGE.fullmatch(text)
        pairs.append((match["field"], match["detail"]) if match else ("", text))
    return pairs


def form_problems(form) -> list[tuple[str, str]]:
    """A Django form's errors (the UI's own messages) as (field, message) pairs."""
    return [
        (field if field != "__all__" else "", str(message))
        for field, messages in form.errors.items()
        for message in messages
    ]


def validation_problems(errors: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """django-ninja's (pydantic's) validation errors: `loc` ("query", "state") names the field."""
    pairs = []
    for error in errors:
        location = [str(part) for part in error.get("loc", ()) if part not in ("query", "body", "path", "header")]
        pairs.append((".".join(location), str(error.get("msg", "invalid"))))
    return pairs
