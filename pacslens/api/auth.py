"""Bearer-token authentication and the permission check every operation makes.

Only `Authorization: Bearer plapi_...` authenticates: no session cookie, so the API needs no CSRF
token and no view outside it is exempted. The permissions are the staff UI's (the same
`app_label.codename` strings its views require), read from the client's role group.
"""

from __future__ import annotations

from django.http import HttpRequest
from ninja.security import HttpBearer

from pacslens.api.models import ApiClient, ApiToken
from pacslens.api.problems import Problem


class ApiBearer(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str) -> ApiClient | None:
        row = ApiToken.authenticate(token.strip())
        if row is None:
            return None
        client = row.client
        request.api_client = client  # type: ignore[attr-defined]
        request.api_permissions = client.permissions()  # type: ignore[attr-defined]
        return client


def client_of(request: HttpRequest) -> ApiClient:
    return request.api_client  # type: ignore[attr-defined]


def require(request: HttpRequest, *permissions: str) -> ApiClient:
    """The calling client, if its role has every permission in `permissions`; else 403."""
    granted: set[str] = getattr(request, "api_permissions", set())
    missing = [p for p in permissions if p not in granted]
    if missing:
        raise Problem(403, f"Your role does not allow this (needs {', '.join(missing)}).")
    return client_of(request)
