"""The API object: /api/v1/ with its OpenAPI schema (/api/v1/openapi.json) and docs page (/api/v1/docs).

django-ninja builds the schema from the endpoints' typed signatures and pydantic schemas (the
library fhir.resources already brings); its docs page is Swagger UI from the files the package
ships, served as our static files (no CDN, no inline script).
"""

from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.openapi.docs import Swagger, _csrf_needed

from pacslens.api import schemas
from pacslens.api.auth import ApiBearer
from pacslens.api.endpoints import (
    alerts,
    coding,
    config,
    deliveries,
    health,
    probes,
    results,
    stow_senders,
    studies,
    webhooks,
)
from pacslens.api.problems import CONTENT_TYPE, TITLES, Problem, problem_response, validation_problems


class PacsLensAPI(NinjaAPI):
    def get_openapi_operation_id(self, operation) -> str:
        # The function's name (study_list), not its module path: what generated clients call.
        return operation.view_func.__name__

    def get_openapi_schema(self, *, path_prefix: str | None = None, path_params: dict | None = None):
        """ninja's schema, plus the problem+json answers every operation may give."""
        schema = super().get_openapi_schema(path_prefix=path_prefix, path_params=path_params)
        schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = schemas.Problem.model_json_schema()
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                statuses = [401, 403, 422] + ([404] if "{" in path else [])
                if method in ("put", "patch", "delete"):
                    statuses += [409, 412, 428]
                elif method == "post":
                    statuses += [409]
                for status in statuses:
                    operation["responses"].setdefault(str(status), PROBLEM_RESPONSES[status])
        return schema


class SwaggerServedLocally(Swagger):
    """ninja's Swagger UI page from the template and files the package ships (settings.NINJA_DIR).

    ninja renders that page only when "ninja" is an installed app, and otherwise one that loads
    Swagger UI from a CDN; it is not an installed app here so that the processes that never serve
    the API (the DICOM listener) do not import it (settings.INSTALLED_APPS).
    """

    def render_page(self, request: HttpRequest, api: NinjaAPI, **kwargs: Any) -> HttpResponse:
        self.settings["url"] = self.get_openapi_url(api, kwargs)
        context = {
            "swagger_settings": json.dumps(self.settings, indent=1),
            "api": api,
            "add_csrf": _csrf_needed(api),
        }
        return render(request, self.template, context)


PROBLEM_RESPONSES = {
    status: {
        "description": f"{TITLES[status]} (RFC 9457 problem details)",
        "content": {CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    for status in (401, 403, 404, 409, 412, 422, 428)
}

api = PacsLensAPI(
    title="PacsLens automation API",
    version="1",
    description=(
        "Studies, the failure queue, results, configuration and health, for integration engines and scripts. "
        "Authenticate with `Authorization: Bearer <token>` (a token from the API clients page or "
        "`manage.py api_token create`). Errors are RFC 9457 problem details. Guide: docs/api.md."
    ),
    auth=ApiBearer(),
    urls_namespace="api-v1",
    docs=SwaggerServedLocally(),
    docs_url="/docs",
    openapi_url="/openapi.json",
)
for module in (studies, deliveries, results, config, coding, probes, stow_senders, alerts, webhooks, health):
    api.add_router("", module.router)


@api.exception_handler(Problem)
def _problem(request: HttpRequest, exc: Problem) -> HttpResponse:
    return problem_response(request, exc.status, exc.detail, errors=exc.errors, headers=exc.headers)


@api.exception_handler(AuthenticationError)
def _unauthenticated(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return problem_response(
        request,
        401,
        "A valid bearer token is required: Authorization: Bearer <token>. It may be wrong, expired or revoked.",
        headers={"WWW-Authenticate": 'Bearer realm="pacslens"'},
    )


@api.exception_handler(ValidationError)
def _invalid(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    errors = validation_problems(exc.errors)
    return problem_response(request, 422, "The request is not valid.", errors=errors)


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    return problem_response(request, exc.status_code, str(exc))


@api.exception_handler(Http404)
def _not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return problem_response(request, 404, "No such object.")


@api.exception_handler(PermissionDenied)
def _forbidden(request: HttpRequest, exc: PermissionDenied) -> HttpResponse:
    return problem_response(request, 403, str(exc) or "Your role does not allow this.")
