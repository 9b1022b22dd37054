"""Periodic sweeps, ensured by `manage.py setup_site` (run by `make run` and on upgrade).

Each entry: (task function, minutes between runs). django-q2's scheduler wakes every ~30 s,
so a one-minute schedule runs every 30–60 s. Sweeps are idempotent and claim rows by
conditional UPDATE, so a duplicate run is harmless.
"""

from __future__ import annotations

SCHEDULES: list[tuple[str, int]] = [
    ("routing.tasks.sweep_completion", 1),
    ("results.tasks.sweep_inference", 1),
    ("results.delivery_tasks.sweep_deliveries", 1),
    # Proves a worker runs scheduled tasks (/healthz "workers"); retention deletes old pixel data.
    ("routing.heartbeat.tasks_heartbeat", 1),
    ("results.retention.retention_sweep", 60),
    # Loops ~55 s claiming due poll sources, so intervals below the scheduler's 30 s work.
    ("routing.pull.poll_due_sources", 1),
]


def schedules_ensure() -> list[str]:
    from django_q.models import Schedule

    names = []
    for func, minutes in SCHEDULES:
        Schedule.objects.update_or_create(
            name=f"pacslens:{func}",
            defaults={"func": func, "schedule_type": Schedule.MINUTES, "minutes": minutes, "repeats": -1},
        )
        names.append(f"pacslens:{func}")
    Schedule.objects.filter(name__startswith="pacslens:").exclude(name__in=names).delete()
    return names
