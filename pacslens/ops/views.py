"""Operations endpoints: /healthz (load balancers, monitoring), /metrics (Prometheus), /conformance,
and the 400 page that explains a refused host name."""

from __future__ import annotations

import hmac

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views import defaults
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pacslens import __version__
from pacslens.ops.conformance import conformance_build
from pacslens.ops.health import health_checks, health_overall
from pacslens.ops.metrics import registry

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_X_REAL_IP", "HTTP_FORWARDED")


def healthz(request: HttpRequest) -> JsonResponse:
    """JSON health of the database, disk, listener and workers; 503 when any is down."""
    checks = health_checks()
    overall = health_overall(checks)
    return JsonResponse(
        {"status": overall, "version": __version__, "checks": checks}, status=503 if overall == "down" else 200
    )


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format. From this host, or anywhere with `Authorization: Bearer <PACSLENS_METRICS_TOKEN>`."""
    if not _metrics_allowed(request):
        return HttpResponse(
            "metrics are served to this host, or with the bearer token PACSLENS_METRICS_TOKEN\n",
            status=403,
            content_type="text/plain",
        )
    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)


@login_required
def conformance(request: HttpRequest) -> HttpResponse:
    """The DICOM conformance statement of this installation, as `manage.py conformance_statement --format html`."""
    return HttpResponse(conformance_build().as_html(), content_type="text/html; charset=utf-8")


def _metrics_allowed(request: HttpRequest) -> bool:
    token = settings.METRICS_TOKEN
    if token:
        given = request.headers.get("Authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), token.encode()):
            return True
    # Behind a reverse proxy every request comes from localhost: a forwarded one is not local.
    forwarded = any(request.META.get(header) for header in PROXY_HEADERS)
    return request.META.get("REMOTE_ADDR") in LOOPBACK and not forwarded


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """400: for a host name not in PACSLENS_ALLOWED_HOSTS (the UI opened from another machine by
    its name or address), a page that says which setting to change instead of a bare 400."""
    if isinstance(exception, DisallowedHost):
        # The Host header as sent (get_host() is what refused it); the template escapes it.
        host = request.META.get("HTTP_HOST", "")[:255]
        return render(
            request,
            "disallowed_host.html",
            {"host": host, "hostname": host.rsplit(":", 1)[0] if not host.endswith("]") else host},
            status=400,
        )
    return defaults.bad_request(request, exception or Exception())
