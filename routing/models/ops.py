"""Operations rows: process heartbeats and persistent counters.

Both live in the database, not in memory, because the processes that write them (listeners,
workers, possibly on several hosts) are not the process that reads them (`/healthz` and
`/metrics` in the web process). Nothing here ever holds patient data.
"""

from __future__ import annotations

from datetime import timedelta

from django.db import models, transaction
from django.db.models import F
from django.utils import timezone

# A process that has not beaten for this long is gone (crashed, killed, host down).
HEARTBEAT_STALE_AFTER = timedelta(days=1)


class HeartbeatRole(models.TextChoices):
    LISTENER = "listener", "DICOM listener process"
    WORKERS = "workers", "Worker cluster supervisor"
    TASKS = "tasks", "Scheduled task run by a worker"


class Heartbeat(models.Model):
    """One row per live process (`host:pid`), stamped every few seconds by that process."""

    role = models.CharField(max_length=16, choices=HeartbeatRole.choices)
    identity = models.CharField(max_length=100, help_text="host:pid of the process")
    started_at = models.DateTimeField(default=timezone.now)
    beat_at = models.DateTimeField(default=timezone.now)
    detail = models.JSONField(default=dict, blank=True, help_text="e.g. port, AE title; never patient data")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["role", "identity"], name="heartbeat_role_identity_unique")]
        indexes = [models.Index(fields=["role", "beat_at"])]

    def __str__(self) -> str:
        return f"{self.role} {self.identity} at {self.beat_at:%Y-%m-%d %H:%M:%S}"

    @classmethod
    def beat(cls, *, role: str, identity: str, detail: dict | None = None) -> None:
        """Stamp this process as alive; also forget processes of the role gone for a day."""
        now = timezone.now()
        updated = cls.objects.filter(role=role, identity=identity).update(beat_at=now, detail=detail or {})
        if not updated:
            cls.objects.create(role=role, identity=identity, started_at=now, beat_at=now, detail=detail or {})
            cls.objects.filter(role=role, beat_at__lt=now - HEARTBEAT_STALE_AFTER).delete()

    @classmethod
    def forget(cls, *, role: str, identity: str) -> None:
        """A clean shutdown: the process is not merely late, it is gone."""
        cls.objects.filter(role=role, identity=identity).delete()

    @classmethod
    def fresh(cls, *, role: str, within: timedelta) -> list[Heartbeat]:
        return list(cls.objects.filter(role=role, beat_at__gte=timezone.now() - within).order_by("identity"))

    @classmethod
    def latest(cls, *, role: str) -> Heartbeat | None:
        return cls.objects.filter(role=role).order_by("-beat_at").first()


class OpsCounter(models.Model):
    """A monotonic counter that survives restarts, e.g. associations rejected for a reason.

    Processes count in memory and add their deltas every few seconds (see pacslens/ops/heartbeat.py),
    so the hot path never writes the database for a counter.
    """

    name = models.CharField(max_length=64)
    label = models.CharField(max_length=100, blank=True, help_text="One label value, e.g. the rejection reason")
    value = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["name", "label"], name="opscounter_name_label_unique")]

    def __str__(self) -> str:
        return f"{self.name}{{{self.label}}} = {self.value}"

    @classmethod
    def add(cls, deltas: dict[tuple[str, str], int]) -> None:
        """Add each (name, label) delta in one short transaction."""
        now = timezone.now()
        with transaction.atomic():
            for (name, label), delta in deltas.items():
                if not delta:
                    continue
                updated = cls.objects.filter(name=name, label=label).update(value=F("value") + delta, updated_at=now)
                if not updated:
                    cls.objects.create(name=name, label=label, value=delta, updated_at=now)

    @classmethod
    def values(cls, name: str) -> dict[str, int]:
        return dict(cls.objects.filter(name=name).values_list("label", "value"))
