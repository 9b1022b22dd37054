"""Dashboard queries: what the pipeline is doing now, how fast, what is stuck, what is healthy.

Everything is read from rows (studies, their events, deliveries, associations, heartbeats), so the
dashboard tells the truth for every process on every host, not for the web one. Health uses the
same checks as /healthz (pacslens/ops/health.py), so the page and the load balancer never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Count, Max, Q
from django.utils import timezone
from django_q.models import OrmQ

from pacslens.ops.health import check_disk, check_heartbeat, check_workers
from results.deliver.identity import installation_current
from results.models import Delivery, DeliveryState, Destination
from routing.models import StoreAssociation, Study, StudyEvent, StudyState

# The stages of the latency table, in pipeline order: the first time a study reached each state.
STAGES = [StudyState.RECEIVING, StudyState.COMPLETE, StudyState.INFERRED, StudyState.DELIVERED]
LATENCY_WINDOW = timedelta(hours=24)
LATENCY_MAX_STUDIES = 2000
# /healthz's check statuses as the status pill's values.
HEALTH_STATUS = {"ok": "ok", "warn": "warning", "down": "down"}


def stuck_thresholds() -> dict[str, timedelta]:
    """How long a study may sit in each working state before the dashboard calls it stuck.
    Settled states (ignored, inferred with nothing to deliver, delivered, closed, failed) are never stuck."""
    task_timeout = settings.Q_CLUSTER["timeout"]
    return {
        StudyState.RECEIVING: timedelta(seconds=settings.STUDY_FORCE_COMPLETE_AFTER + 120),
        StudyState.COMPLETE: timedelta(minutes=5),
        StudyState.ROUTED: timedelta(minutes=15),
        StudyState.INFERRING: timedelta(seconds=task_timeout * 1.5),
        # No INFERRED: its deliveries are written in the transaction that makes it inferred
        # (and move it on to delivering), so an inferred study has nothing to deliver: settled.
        StudyState.DELIVERING: timedelta(hours=1),
    }


@dataclass
class StageLatency:
    from_state: str
    to_state: str
    count: int
    p50: float | None
    p95: float | None

    @property
    def p50_text(self) -> str:
        return duration_text(self.p50)

    @property
    def p95_text(self) -> str:
        return duration_text(self.p95)


@dataclass
class Health:
    name: str
    status: str  # ok, idle, warning, down, unknown: the status pill's value
    detail: str


def dashboard_counts(*, now: datetime | None = None) -> dict:
    now = now or timezone.now()
    since = now - timedelta(hours=24)
    current = dict(Study.objects.values_list("state").annotate(n=Count("id")).values_list("state", "n"))
    recent = dict(
        Study.objects.filter(first_received_at__gte=since)
        .values_list("state")
        .annotate(n=Count("id"))
        .values_list("state", "n")
    )
    states = [
        {"state": s.value, "label": s.label, "now": current.get(s.value, 0), "day": recent.get(s.value, 0)}
        for s in StudyState
    ]
    return {"states": states, "total_now": sum(current.values()), "total_day": sum(recent.values())}


def deliveries_by_destination() -> list[dict]:
    rows = (
        Delivery.objects.filter(state__in=[DeliveryState.PENDING, DeliveryState.IN_FLIGHT, DeliveryState.FAILED])
        .values("destination_id", "destination__name")
        .annotate(
            pending=Count("id", filter=Q(state__in=[DeliveryState.PENDING, DeliveryState.IN_FLIGHT])),
            failed=Count("id", filter=Q(state=DeliveryState.FAILED)),
        )
        .order_by("destination__name")
    )
    return [
        {
            "destination_id": r["destination_id"],
            "name": r["destination__name"],
            "pending": r["pending"],
            "failed": r["failed"],
        }
        for r in rows
    ]


def stage_latencies(*, now: datetime | None = None) -> list[StageLatency]:
    """p50/p95 seconds between consecutive stages, over studies received in the last 24 hours."""
    now = now or timezone.now()
    study_ids = list(
        Study.objects.filter(first_received_at__gte=now - LATENCY_WINDOW)
        .order_by("-first_received_at")
        .values_list("id", flat=True)[:LATENCY_MAX_STUDIES]
    )
    firsts: dict[int, dict[str, datetime]] = {}
    events = StudyEvent.objects.filter(study_id__in=study_ids, to_state__in=STAGES).values_list(
        "study_id", "to_state", "at"
    )
    for study_id, state, at in events.order_by("at", "id"):
        firsts.setdefault(study_id, {}).setdefault(state, at)
    latencies = []
    for before, after in zip(STAGES, STAGES[1:]):
        # From the last stage before `after` that the study actually went through (inferred → delivered
        # skips nothing; a study without inference has no inferred stage and no delivered one either).
        samples = sorted(
            (times[after] - times[before]).total_seconds()
            for times in firsts.values()
            if before in times and after in times
        )
        latencies.append(
            StageLatency(before, after, len(samples), _percentile(samples, 0.50), _percentile(samples, 0.95))
        )
    return latencies


def studies_stuck(*, now: datetime | None = None, limit: int = 20) -> list[dict]:
    now = now or timezone.now()
    condition = Q()
    for state, allowed in stuck_thresholds().items():
        condition |= Q(state=state, state_changed_at__lt=now - allowed)
    rows = Study.objects.filter(condition).order_by("state_changed_at")[:limit]
    return [
        {"study": s, "state": s.state, "for_text": duration_text((now - s.state_changed_at).total_seconds())}
        for s in rows
    ]


def health_listener(*, now: datetime | None = None) -> Health:
    """The listeners' heartbeats (as /healthz reads them), with the last association they took."""
    now = now or timezone.now()
    check = check_heartbeat("listener")
    parts = [_heartbeat_text(check)]
    latest = StoreAssociation.objects.aggregate(last=Max("started_at"))["last"]
    parts.append(f"last association {_ago(now - latest)} ago" if latest else "no association received yet")
    return Health("DICOM listener", HEALTH_STATUS[check["status"]], "; ".join(parts))


def health_workers() -> Health:
    """The worker cluster's heartbeat and its scheduled tasks (as /healthz), and the queue length."""
    check = check_workers()
    detail = _heartbeat_text(check)
    if "last_task_seconds_ago" in check:
        detail += f"; last scheduled task {duration_text(check['last_task_seconds_ago'])} ago"
    if check.get("message") and check["status"] == "warn":
        detail += f" ({check['message']})"
    return Health("Workers", HEALTH_STATUS[check["status"]], f"{detail}; {OrmQ.objects.count()} queued")


def health_disk() -> Health:
    check = check_disk()
    detail = f"{check['free_mb']} MiB free (floor {check['floor_mb']} MiB)"
    return Health(
        "Disk", HEALTH_STATUS[check["status"]], detail + (f": {check['message']}" if check.get("message") else "")
    )


def health_destinations(*, now: datetime | None = None) -> list[dict]:
    """Each destination's state as deliveries and the last Test left it, the breaker included."""
    now = now or timezone.now()
    rows = []
    for destination in Destination.objects.order_by("name"):
        if not destination.enabled:
            status, label = "disabled", "disabled"
        elif destination.circuit_open:
            status, label = "open", f"circuit open until {destination.circuit_open_until_text}"
        elif destination.consecutive_failures:
            status, label = "warning", f"{destination.consecutive_failures} failure(s) in a row"
        elif destination.last_test_failed:
            status, label = "warning", "last Test failed"
        else:
            status, label = "ok", "ok"
        rows.append(
            {
                "destination": destination,
                "status": status,
                "label": label,
                "detail": _destination_detail(destination, now),
            }
        )
    return rows


def _destination_detail(destination: Destination, now: datetime) -> str:
    success = destination.last_success_at
    parts = [f"last delivery {_ago(now - success)} ago" if success else "no delivery yet"]
    if destination.last_test_at is not None:
        outcome = "passed" if destination.last_test_ok else "failed"
        parts.append(f"Test {outcome} {_ago(now - destination.last_test_at)} ago: {destination.last_test_detail}")
    else:
        parts.append("never tested")
    return " · ".join(parts)


def dashboard_data() -> dict:
    now = timezone.now()
    return {
        "counts": dashboard_counts(now=now),
        "deliveries": deliveries_by_destination(),
        "latencies": stage_latencies(now=now),
        "stuck": studies_stuck(now=now),
        "health": [health_listener(now=now), health_workers(), health_disk()],
        "destinations": health_destinations(now=now),
        "installation": installation_current(),
        "generated_at": now,
    }


def _percentile(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    # Nearest rank: simple, and honest about small samples.
    index = min(len(samples) - 1, max(0, round(q * len(samples) + 0.5) - 1))
    return samples[index]


def _heartbeat_text(check: dict) -> str:
    if check.get("processes"):
        return f"{check['processes']} process(es), last beat {duration_text(check['last_beat_seconds_ago'])} ago"
    if "last_beat_seconds_ago" in check:
        return f"no process: last beat {duration_text(check['last_beat_seconds_ago'])} ago"
    return "no process has ever reported"


def _ago(age: timedelta) -> str:
    return duration_text(age.total_seconds())


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"
