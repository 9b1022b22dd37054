"""Health checks of the database, disk, listener and workers: one home for /healthz and the dashboard,
so the page and the load balancer never disagree.

Each check returns a JSON-ready dict whose `status` is ok, warn or down, with the figures behind it.
Listener and workers are judged by their heartbeat rows, so the answer holds for every process on
every host, not only for the web one.
"""

from __future__ import annotations

import shutil
from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.utils import timezone

from pacslens.ops.heartbeat import HEARTBEAT_INTERVAL
from routing.models import Heartbeat

# A process that missed three beats is down; the scheduled task beat runs every 30-60 s and a
# busy cluster may delay it by up to a task timeout, so it only warns.
HEARTBEAT_DOWN_AFTER = timedelta(seconds=HEARTBEAT_INTERVAL * 3)


def health_checks() -> dict[str, dict]:
    """Every check by name; the listener and workers only when the database answers."""
    checks = {"database": check_database()}
    checks["disk"] = check_disk()
    if checks["database"]["status"] == "ok":
        checks["listener"] = check_heartbeat("listener")
        checks["workers"] = check_workers()
    return checks


def health_overall(checks: dict[str, dict]) -> str:
    """down if any check is down, else warn if any warns, else ok."""
    statuses = {check["status"] for check in checks.values()}
    return "down" if "down" in statuses else "warn" if "warn" in statuses else "ok"


def check_database() -> dict:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return {"status": "ok"}
    except Exception as exc:  # any database failure means unhealthy
        return {"status": "down", "error": type(exc).__name__}


def check_disk() -> dict:
    free_mb = shutil.disk_usage(settings.DATA_DIR).free // 2**20
    floor, warning = settings.DISK_FREE_FLOOR_MB, settings.DISK_FREE_WARNING_MB
    check = {"status": "ok", "free_mb": free_mb, "floor_mb": floor, "warning_mb": warning}
    if free_mb < floor:
        check.update(status="down", message="below the floor: the listener refuses new data (0xA700)")
    elif free_mb < warning:
        check.update(status="warn", message="below the warning level: free space or lower PACSLENS_RETENTION_DAYS")
    return check


def check_heartbeat(role: str) -> dict:
    fresh = Heartbeat.fresh(role=role, within=HEARTBEAT_DOWN_AFTER)
    if fresh:
        age = (timezone.now() - max(beat.beat_at for beat in fresh)).total_seconds()
        return {"status": "ok", "processes": len(fresh), "last_beat_seconds_ago": round(age, 1)}
    latest = Heartbeat.latest(role=role)
    check: dict = {
        "status": "down",
        "processes": 0,
        "message": f"no {role} process has reported for {HEARTBEAT_DOWN_AFTER.total_seconds():.0f} s",
    }
    if latest:
        check["last_beat_seconds_ago"] = round((timezone.now() - latest.beat_at).total_seconds(), 1)
    return check


def check_workers() -> dict:
    check = check_heartbeat("workers")
    tasks = Heartbeat.latest(role="tasks")
    allowed = timedelta(minutes=5) + timedelta(seconds=settings.Q_CLUSTER["timeout"])
    if tasks is not None:
        check["last_task_seconds_ago"] = round((timezone.now() - tasks.beat_at).total_seconds(), 1)
    if check["status"] == "ok" and (tasks is None or timezone.now() - tasks.beat_at > allowed):
        check.update(status="warn", message="workers are up but no scheduled task ran recently (busy or stuck?)")
    return check
