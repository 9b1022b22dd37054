"""Periodic sweeps, ensured by `manage.py setup_site` (run by `make run` and on upgrade).

Each entry: (task function, minutes between runs). django-q2's scheduler wakes every ~30 s,
so a one-minute schedule runs every 30–60 s. Sweeps are idempotent and claim rows by
conditional UPDATE, so a duplicate run is harmless.
"""

from __future__ import annotations

from django.db import connection, transaction
from django_q.models import Schedule

SCHEDULES: list[tuple[str, int]] = [
    ("routing.tasks.sweep_completion", 1),
    # Orphaned receive files; the listener sweeps at start too, but it may run for months.
    ("routing.tasks.sweep_incoming", 15),
    ("results.tasks.sweep_inference", 1),
    ("results.delivery_tasks.sweep_deliveries", 1),
    # Proves a worker runs scheduled tasks (/healthz "workers"); retention deletes old pixel data.
    ("pacslens.ops.heartbeat.tasks_heartbeat", 1),
    ("pacslens.ops.retention.retention_sweep", 60),
    # Loops ~55 s claiming due poll sources, so intervals below the scheduler's 30 s work.
    ("routing.pull.poll.poll_due_sources", 1),
    # Alert rules: one alert when a condition starts, one when it clears (pacslens/ops/alerts).
    ("pacslens.ops.alerts.service.alerts_check", 1),
    # Outbound event webhooks: retries whose backoff ended, lost wake-ups (results/deliver/webhooks.py).
    ("results.delivery_tasks.send_webhooks", 1),
]


def schedules_ensure() -> list[str]:
    names = []
    with transaction.atomic():
        # Several run_workers start at once on a scaled-out site, and Schedule.name is not unique:
        # on PostgreSQL two update_or_create calls would both insert. One lock serialises them
        # (SQLite's IMMEDIATE transaction already does).
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEDULES_LOCK_ID])
        for func, minutes in SCHEDULES:
            name = f"pacslens:{func}"
            rows = list(Schedule.objects.filter(name=name).order_by("id"))
            for duplicate in rows[1:]:  # left by an earlier version's race
                duplicate.delete()
            Schedule.objects.update_or_create(
                name=name,
                defaults={"func": func, "schedule_type": Schedule.MINUTES, "minutes": minutes, "repeats": -1},
            )
            names.append(name)
        Schedule.objects.filter(name__startswith="pacslens:").exclude(name__in=names).delete()
    return names


SCHEDULES_LOCK_ID = 0x5041_4353  # "PACS": any constant shared by every PacsLens process
