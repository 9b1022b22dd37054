"""Operations endpoints: /healthz (load balancers, monitoring), /metrics (Prometheus), /conformance."""

from __future__ import annotations

import hmac
import shutil
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone

from pacslens.ops.heartbeat import HEARTBEAT_INTERVAL

# A process that missed three beats is down; the scheduled task beat runs every 30-60 s and a
# busy cluster may delay it by up to a task timeout, so it only warns.
HEARTBEAT_DOWN_AFTER = timedelta(seconds=HEARTBEAT_INTERVAL * 3)
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_X_REAL_IP", "HTTP_FORWARDED")


def healthz(request: HttpRequest) -> JsonResponse:
    """JSON health of the database, disk, listener and workers; 503 when any is down."""
    checks = {"database": _check_database()}
    checks["disk"] = _check_disk()
    if checks["database"]["status"] == "ok":
        checks["listener"] = _check_heartbeat("listener")
        checks["workers"] = _check_workers()
    statuses = {check["status"] for check in checks.values()}
    overall = "down" if "down" in statuses else "warn" if "warn" in statuses else "ok"
    return JsonResponse({"status": overall, "checks": checks}, status=503 if overall == "down" else 200)


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format. From this host, or anywhere with `Authorization: Bearer <PACSLENS_METRICS_TOKEN>`."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from pacslens.ops.metrics import registry

    if not _metrics_allowed(request):
        return HttpResponse("metrics are served to this host, or with the bearer token PACSLENS_METRICS_TOKEN\n",
                            status=403, content_type="text/plain")
    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)


@login_required
def conformance(request: HttpRequest) -> HttpResponse:
    """The DICOM conformance statement of this installation, as `manage.py conformance_statement --format html`."""
    from pacslens.ops.conformance import conformance_build

    return HttpResponse(conformance_build().as_html(), content_type="text/html; charset=utf-8")


# --- checks ----------------------------------------------------------------------------------


def _check_database() -> dict:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return {"status": "ok"}
    except Exception as exc:  # any database failure means unhealthy
        return {"status": "down", "error": type(exc).__name__}


def _check_disk() -> dict:
    free_mb = shutil.disk_usage(settings.DATA_DIR).free // 2**20
    floor, warning = settings.DISK_FREE_FLOOR_MB, settings.DISK_FREE_WARNING_MB
    check = {"status": "ok", "free_mb": free_mb, "floor_mb": floor, "warning_mb": warning}
    if free_mb < floor:
        check.update(status="down", message="below the floor: the listener refuses new data (0xA700)")
    elif free_mb < warning:
        check.update(status="warn", message="below the warning level: free space or lower PACSLENS_RETENTION_DAYS")
    return check


def _check_heartbeat(role: str) -> dict:
    from routing.models import Heartbeat

    fresh = Heartbeat.fresh(role=role, within=HEARTBEAT_DOWN_AFTER)
    if fresh:
        age = (timezone.now() - max(beat.beat_at for beat in fresh)).total_seconds()
        return {"status": "ok", "processes": len(fresh), "last_beat_seconds_ago": round(age, 1)}
    latest = Heartbeat.latest(role=role)
    check: dict = {"status": "down", "processes": 0, "message": f"no {role} process has reported for "
                   f"{HEARTBEAT_DOWN_AFTER.total_seconds():.0f} s"}
    if latest:
        check["last_beat_seconds_ago"] = round((timezone.now() - latest.beat_at).total_seconds(), 1)
    return check


def _check_workers() -> dict:
    from routing.models import Heartbeat

    check = _check_heartbeat("workers")
    tasks = Heartbeat.latest(role="tasks")
    allowed = timedelta(minutes=5) + timedelta(seconds=settings.Q_CLUSTER["timeout"])
    if tasks is not None:
        check["last_task_seconds_ago"] = round((timezone.now() - tasks.beat_at).total_seconds(), 1)
    if check["status"] == "ok" and (tasks is None or timezone.now() - tasks.beat_at > allowed):
        check.update(status="warn", message="workers are up but no scheduled task ran recently (busy or stuck?)")
    return check


def _metrics_allowed(request: HttpRequest) -> bool:
    token = settings.METRICS_TOKEN
    if token:
        given = request.headers.get("Authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), token.encode()):
            return True
    # Behind a reverse proxy every request comes from localhost: a forwarded one is not local.
    forwarded = any(request.META.get(header) for header in PROXY_HEADERS)
    return request.META.get("REMOTE_ADDR") in LOOPBACK and not forwarded
