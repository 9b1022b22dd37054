"""/healthz: database, disk, listener and worker heartbeats; 503 when something is down.
Plus the heartbeat a real `manage.py dicom_listener` writes, and its association counters."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from pacslens.ops.heartbeat import HeartbeatThread
from routing.models import Heartbeat

pytestmark = pytest.mark.django_db


def health(expected_status: int) -> dict:
    response = Client(HTTP_HOST="localhost").get("/healthz")
    assert response.status_code == expected_status, response.content
    assert response["X-Request-ID"]
    return response.json()


def all_beating() -> None:
    for role in ("listener", "workers", "tasks"):
        Heartbeat.beat(role=role, identity=f"host:{role}")


class TestChecks:
    def test_everything_up(self, data_dir):
        all_beating()
        body = health(200)
        assert body["status"] == "ok"
        assert {name: check["status"] for name, check in body["checks"].items()} == {
            "database": "ok",
            "disk": "ok",
            "listener": "ok",
            "workers": "ok",
        }
        assert body["checks"]["listener"]["processes"] == 1

    def test_no_listener_is_down(self, data_dir):
        Heartbeat.beat(role="workers", identity="host:1")
        Heartbeat.beat(role="tasks", identity="host:1")
        body = health(503)
        assert body["status"] == "down"
        assert body["checks"]["listener"]["status"] == "down"

    def test_a_silent_listener_is_down(self, data_dir):
        all_beating()
        Heartbeat.objects.filter(role="listener").update(beat_at=timezone.now() - timedelta(minutes=2))
        body = health(503)
        assert body["checks"]["listener"]["last_beat_seconds_ago"] >= 120

    def test_a_clean_stop_forgets_the_process(self, data_dir):
        all_beating()
        Heartbeat.forget(role="listener", identity="host:listener")
        assert health(503)["checks"]["listener"]["processes"] == 0

    def test_workers_that_run_no_task_warn(self, data_dir):
        all_beating()
        Heartbeat.objects.filter(role="tasks").update(beat_at=timezone.now() - timedelta(hours=1))
        body = health(200)
        assert body["status"] == "warn"
        assert body["checks"]["workers"]["status"] == "warn"

    def test_disk_below_the_warning_level_warns(self, data_dir, settings):
        all_beating()
        settings.DISK_FREE_FLOOR_MB = 0
        settings.DISK_FREE_WARNING_MB = 1 << 40  # a petabyte: always below it
        body = health(200)
        assert body["checks"]["disk"]["status"] == "warn"
        assert "PACSLENS_RETENTION_DAYS" in body["checks"]["disk"]["message"]

    def test_disk_below_the_floor_is_down(self, data_dir, settings):
        all_beating()
        settings.DISK_FREE_FLOOR_MB = settings.DISK_FREE_WARNING_MB = 1 << 40
        body = health(503)
        assert body["checks"]["disk"]["status"] == "down"

    def test_a_dead_cluster_stops_beating(self, transactional_db, data_dir):
        # transactional: a beat calls close_old_connections(), which closes a connection inside atomic()
        thread = HeartbeatThread(role="workers", alive=lambda: False)
        thread.beat_once()
        assert not Heartbeat.objects.filter(role="workers").exists()


@pytest.mark.interop
class TestListenerProcess:
    def test_the_listener_beats_counts_rejections_and_forgets_itself_on_sigterm(self, listener_factory):
        from tests.support.listener_proc import DEFAULT_CALLING_AE_TITLES

        listener = listener_factory(processes=2)
        assert listener.echo(calling_ae_title="NOT_ALLOWED") is None  # rejected
        assert listener.echo(calling_ae_title=DEFAULT_CALLING_AE_TITLES[-1]) == 0
        beats = wait_for(lambda: listener.query("SELECT * FROM routing_heartbeat WHERE role = 'listener'"), count=2)
        assert all('"ae_title": "PACSLENS"' in beat["detail"] for beat in beats)
        counters = wait_for(
            lambda: listener.query("SELECT * FROM routing_opscounter WHERE label LIKE 'rejected:%'"), count=1
        )
        assert counters[0]["label"] == "rejected:calling-ae-not-recognised" and counters[0]["value"] == 1
        assert listener.stop() == 0
        assert listener.query("SELECT * FROM routing_heartbeat") == []


def wait_for(read, *, count: int, timeout: float = 40.0) -> list[dict]:
    """Poll until `read()` returns at least `count` rows (beats come every 10 s)."""
    deadline = time.monotonic() + timeout
    rows = read()
    while len(rows) < count and time.monotonic() < deadline:
        time.sleep(0.5)
        rows = read()
    assert len(rows) >= count, rows
    return rows
