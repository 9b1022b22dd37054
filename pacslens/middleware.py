"""Request ids: every log line of a web request names it, and the response returns it.

A proxy's `X-Request-ID` is kept when it looks like an id (so the proxy's access log and ours
line up); anything else is replaced, never logged as given.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from pacslens.logs import request_id_var
from routing.models.access_audit import audit_request

REQUEST_ID_HEADER = "X-Request-ID"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


class RequestIdMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex[:16]
        request.request_id = request_id  # type: ignore[attr-defined]
        # Not reset on the way out: Django logs 4xx/5xx responses ("django.request") after the
        # middleware chain returned, and that line should carry the id too. The next request in
        # this thread (or context, under ASGI) sets its own.
        request_id_var.set(request_id)
        response = self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        return response


class AuditRequestMiddleware:
    """Changes of users, groups, permissions and tokens made while serving a request (the admin,
    the staff UI) are attributed to its user (routing/models/access_audit.py). After
    AuthenticationMiddleware, which gives the request its user."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        with audit_request(request):
            return self.get_response(request)
