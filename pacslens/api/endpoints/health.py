"""Health and queue depth: what the dashboard shows, from the same functions."""

from __future__ import annotations

from django.http import HttpRequest
from django_q.models import OrmQ
from ninja import Router

from pacslens.api import schemas
from pacslens.api.auth import require
from pacslens.ops.health import health_checks, health_overall
from pacslens.staff.dashboard_data import dashboard_counts, deliveries_by_destination, studies_stuck

router = Router(tags=["operations"])


@router.get("/health", response=schemas.Health, summary="Health checks and queue depth")
def health(request: HttpRequest):
    """/healthz's checks, the task queue's length, studies per state (now and received in the
    last 24 h), pending and failed deliveries per destination, and studies stuck in a state."""
    require(request, "routing.view_study")  # as the dashboard
    checks = health_checks()
    counts = dashboard_counts()
    return {
        "status": health_overall(checks),
        "checks": checks,
        "queue": {
            "tasks": OrmQ.objects.count(),
            "studies": {s["state"]: {"now": s["now"], "day": s["day"]} for s in counts["states"]},
            "deliveries": deliveries_by_destination(),
            "stuck": [_stuck(s) for s in studies_stuck()],
        },
    }


def _stuck(row: dict) -> dict:
    study = row["study"]
    return {
        "study_id": study.pk,
        "state": row["state"],
        "since": study.state_changed_at.isoformat(),
        "for": row["for_text"],
    }
