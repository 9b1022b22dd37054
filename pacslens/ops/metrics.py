"""Prometheus metrics, read from the database at scrape time.

Why a custom collector over the database rather than counters in memory: the listener, the
workers and the web server are separate processes (and may be on several hosts), and every
figure worth alerting on is already a row — instances, associations, studies, results,
deliveries and their attempts. Reading rows at scrape time is correct across processes and
restarts with no shared memory or multiprocess directory. Counters that have no row of their
own (associations accepted/rejected) are `OpsCounter` rows the listener adds to every few seconds.

Histograms are computed in SQL (one COUNT per bucket in a single query), so a scrape costs a
handful of aggregate queries however long the history grows. Nothing here carries patient data:
labels are AE titles, destination names, model names and states.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import (
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    FloatField,
    Max,
    Min,
    Q,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce
from django.utils import timezone
from django_q.models import OrmQ, Task
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from pacslens.ops.heartbeat import ASSOCIATIONS_COUNTER
from results.models import (
    AlertState,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Destination,
    InferenceResult,
)
from results.monitoring import scored_results
from routing.models import (
    Heartbeat,
    Instance,
    OpsCounter,
    Poll,
    PollSource,
    StoreAssociation,
    Study,
    StudyRetrieve,
    StudyState,
)
from routing.receive.scp import PDUS_REFUSED_COUNTER

INFERENCE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LATENCY_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
WORKLIST_KINDS = ("hl7", "fhir")  # deliveries that update the radiologist's worklist


class DatabaseCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        yield from received()
        yield from associations()
        yield from studies()
        yield from inference()
        yield from model_scores()
        yield from deliveries()
        yield from pulls()
        yield from worklist_latency()
        yield from queue()
        yield from disk()
        yield from heartbeats()
        yield from alerts()


def registry() -> CollectorRegistry:
    """A registry holding only our collector (no process metrics of whichever web worker answers)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DatabaseCollector())
    return reg


# --- received data ---------------------------------------------------------------------------


def received() -> Iterator[Metric]:
    instances = CounterMetricFamily(
        "pacslens_instances_received",
        "Instances received and recorded (C-STORE, retrieve, STOW-RS)",
        labels=["calling_ae_title"],
    )
    size = CounterMetricFamily("pacslens_received_bytes", "Bytes of instances received", labels=["calling_ae_title"])
    for row in Instance.objects.values("calling_ae_title").annotate(n=Count("pk"), b=Sum("size")).order_by():
        instances.add_metric([row["calling_ae_title"]], row["n"])
        size.add_metric([row["calling_ae_title"]], row["b"] or 0)
    yield instances
    yield size

    stored = Instance.objects.aggregate(
        kept=Count("pk", filter=Q(deleted_at=None)),
        kept_bytes=Sum("size", filter=Q(deleted_at=None)),
        deleted=Count("pk", filter=Q(deleted_at__isnull=False)),
    )
    yield _gauge("pacslens_instances_stored", "Instances whose pixel data is on disk", stored["kept"])
    yield _gauge("pacslens_instances_stored_bytes", "Bytes of instances on disk", stored["kept_bytes"] or 0)
    yield _counter(
        "pacslens_retention_deleted_instances", "Instances whose pixel data retention deleted", stored["deleted"]
    )

    last = Study.objects.aggregate(at=Max("last_received_at"))["at"]
    yield _gauge(
        "pacslens_last_instance_received_timestamp_seconds",
        "Unix time of the most recent instance received (0: never)",
        last.timestamp() if last else 0,
    )


def associations() -> Iterator[Metric]:
    metric = CounterMetricFamily(
        "pacslens_dicom_associations",
        "Inbound associations answered by the listener, by result and A-ASSOCIATE-RJ reason",
        labels=["result", "reason"],
    )
    for label, value in sorted(OpsCounter.values(ASSOCIATIONS_COUNTER).items()):
        result, _, reason = label.partition(":")
        metric.add_metric([result, reason], value)
    yield metric
    refused = CounterMetricFamily(
        "pacslens_dicom_pdus_refused",
        "PDUs the listener refused unread (longer than negotiated) and aborted their association for, by reason",
        labels=["reason"],
    )
    for label, value in sorted(OpsCounter.values(PDUS_REFUSED_COUNTER).items()):
        refused.add_metric([label], value)
    yield refused
    yield _counter(
        "pacslens_store_associations",
        "Associations that stored at least one instance",
        StoreAssociation.objects.count(),
    )


def studies() -> Iterator[Metric]:
    counts = dict(Study.objects.values_list("state").annotate(n=Count("pk")).order_by())
    metric = GaugeMetricFamily("pacslens_studies", "Studies by state", labels=["state"])
    for state in StudyState.values:
        metric.add_metric([state], counts.get(state, 0))
    yield metric


# --- inference -------------------------------------------------------------------------------


def inference() -> Iterator[Metric]:
    results = CounterMetricFamily(
        "pacslens_inference_results", "Inference results by model and status", labels=["model", "status"]
    )
    for count_row in InferenceResult.objects.values("model_name", "status").annotate(n=Count("pk")).order_by():
        results.add_metric([count_row["model_name"], count_row["status"]], count_row["n"])
    yield results

    total = (
        Coalesce(F("load_seconds"), Value(0.0))
        + Coalesce(F("preprocess_seconds"), Value(0.0))
        + Coalesce(F("infer_seconds"), Value(0.0))
    )
    rows = (
        InferenceResult.objects.filter(infer_seconds__isnull=False)
        .alias(total=ExpressionWrapper(total, output_field=FloatField()))
        .values("model_name")
        .annotate(n=Count("pk"), s=Sum("total"), **_bucket_counts("total", INFERENCE_BUCKETS))
        .order_by()
    )
    histogram = HistogramMetricFamily(
        "pacslens_inference_duration_seconds", "Model run time per study: load + preprocess + infer", labels=["model"]
    )
    for row in rows:
        histogram.add_metric([row["model_name"]], _buckets(row, INFERENCE_BUCKETS), row["s"] or 0.0)
    yield histogram


SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SHARE_WINDOWS = {"1d": timedelta(days=1), "7d": timedelta(days=7)}


def model_scores() -> Iterator[Metric]:
    """Score monitoring per model version, live and shadow apart (results/monitoring.py): the
    score histogram and flagged count over all current results (use increase() for a period),
    and the share flagged over the last day and week for alerts that need no PromQL."""
    labels = ["model", "version", "shadow"]
    rows = (
        scored_results()
        .values("model_name", "model_version", "shadow")
        .annotate(
            n=Count("pk"),
            s=Sum("score"),
            flagged_n=Count("pk", filter=Q(flagged=True)),
            **_bucket_counts("score", SCORE_BUCKETS),
        )
        .order_by()
    )
    histogram = HistogramMetricFamily(
        "pacslens_model_score", "Scores of current succeeded results per model version", labels=labels
    )
    flagged = CounterMetricFamily(
        "pacslens_model_flagged", "Current succeeded results the model flagged", labels=labels
    )
    for row in rows:
        key = [row["model_name"], row["model_version"], "true" if row["shadow"] else "false"]
        histogram.add_metric(key, _buckets(row, SCORE_BUCKETS), row["s"] or 0.0)
        flagged.add_metric(key, row["flagged_n"])
    yield histogram
    yield flagged
    share = GaugeMetricFamily(
        "pacslens_model_flagged_share",
        "Share of scored results flagged over the window (absent when there were none)",
        labels=[*labels, "window"],
    )
    scored = GaugeMetricFamily(
        "pacslens_model_scored_results", "Scored results over the window", labels=[*labels, "window"]
    )
    now = timezone.now()
    for window, span in SHARE_WINDOWS.items():
        for recent in (
            scored_results()
            .filter(created_at__gte=now - span)
            .values("model_name", "model_version", "shadow")
            .annotate(n=Count("pk"), flagged_n=Count("pk", filter=Q(flagged=True)))
            .order_by()
        ):
            key = [recent["model_name"], recent["model_version"], "true" if recent["shadow"] else "false", window]
            scored.add_metric(key, recent["n"])
            share.add_metric(key, recent["flagged_n"] / recent["n"])
    yield share
    yield scored


# --- delivery --------------------------------------------------------------------------------


def deliveries() -> Iterator[Metric]:
    states = GaugeMetricFamily(
        "pacslens_deliveries", "Deliveries by destination and state", labels=["destination", "kind", "state"]
    )
    counts = {
        (row["destination__name"], row["state"]): row["n"]
        for row in Delivery.objects.values("destination__name", "state").annotate(n=Count("pk")).order_by()
    }
    breaker = GaugeMetricFamily(
        "pacslens_destination_circuit_open", "1 while the destination's circuit breaker is open", labels=["destination"]
    )
    failures = GaugeMetricFamily(
        "pacslens_destination_consecutive_failures", "Transient failures in a row", labels=["destination"]
    )
    now = timezone.now()
    for destination in Destination.objects.order_by("name"):
        for state in DeliveryState.values:
            states.add_metric([destination.name, destination.kind, state], counts.get((destination.name, state), 0))
        open_ = bool(destination.circuit_open_until and destination.circuit_open_until > now)
        breaker.add_metric([destination.name], 1 if open_ else 0)
        failures.add_metric([destination.name], destination.consecutive_failures)
    yield states
    yield breaker
    yield failures

    attempts = CounterMetricFamily(
        "pacslens_delivery_attempts", "Delivery attempts by destination and outcome", labels=["destination", "outcome"]
    )
    for row in (
        DeliveryAttempt.objects.values("delivery__destination__name", "outcome").annotate(n=Count("pk")).order_by()
    ):
        attempts.add_metric([row["delivery__destination__name"], row["outcome"]], row["n"])
    yield attempts

    oldest = Delivery.objects.filter(state__in=[DeliveryState.PENDING, DeliveryState.IN_FLIGHT]).aggregate(
        at=Min("created_at")
    )["at"]
    yield _gauge(
        "pacslens_delivery_oldest_pending_age_seconds",
        "Age of the oldest delivery not yet delivered or failed (0: none)",
        (now - oldest).total_seconds() if oldest else 0,
    )


# --- pull ------------------------------------------------------------------------------------


def pulls() -> Iterator[Metric]:
    """Retrieves by source and state (`failed`: failed for good, in the failure queue), polls by
    outcome, and each source's failed polls in a row."""
    sources = list(PollSource.objects.order_by("name"))
    retrieves = GaugeMetricFamily(
        "pacslens_retrieves", "Study retrieves by poll source and state", labels=["source", "state"]
    )
    counts = {
        (row["source__name"], row["state"]): row["n"]
        for row in StudyRetrieve.objects.values("source__name", "state").annotate(n=Count("pk")).order_by()
    }
    polls = CounterMetricFamily("pacslens_polls", "Polls by poll source and outcome", labels=["source", "status"])
    poll_counts = {
        (row["source__name"], row["status"]): row["n"]
        for row in Poll.objects.values("source__name", "status").annotate(n=Count("pk")).order_by()
    }
    failing = GaugeMetricFamily("pacslens_poll_source_consecutive_failures", "Failed polls in a row", labels=["source"])
    for source in sources:
        for state in StudyRetrieve.State.values:
            retrieves.add_metric([source.name, state], counts.get((source.name, state), 0))
        for status in Poll.Status.values:
            polls.add_metric([source.name, status], poll_counts.get((source.name, status), 0))
        failing.add_metric([source.name], source.consecutive_failures)
    yield retrieves
    yield polls
    yield failing


def worklist_latency() -> Iterator[Metric]:
    """Last instance received → worklist updated (an HL7 or FHIR delivery acknowledged)."""
    latency = ExpressionWrapper(F("delivered_at") - F("study__last_received_at"), output_field=DurationField())
    rows = (
        Delivery.objects.filter(kind__in=WORKLIST_KINDS, state=DeliveryState.DELIVERED, delivered_at__isnull=False)
        .alias(latency=latency)
        .filter(latency__gte=timedelta(0))  # an amended study received again after its delivery
        .values("kind")
        .annotate(n=Count("pk"), s=Sum("latency"), **_bucket_counts("latency", LATENCY_BUCKETS, as_duration=True))
        .order_by()
    )
    histogram = HistogramMetricFamily(
        "pacslens_worklist_latency_seconds",
        "End to end: last instance of a study received to its worklist update acknowledged",
        labels=["kind"],
    )
    for row in rows:
        total = row["s"]
        seconds = total.total_seconds() if isinstance(total, timedelta) else float(total or 0) / 1e6
        histogram.add_metric([row["kind"]], _buckets(row, LATENCY_BUCKETS), seconds)
    yield histogram


# --- queue, disk, processes ------------------------------------------------------------------


def queue() -> Iterator[Metric]:
    now = timezone.now()
    waiting = OrmQ.objects.filter(lock__lte=now)
    metric = GaugeMetricFamily("pacslens_queue_tasks", "django-q2 broker rows", labels=["status"])
    metric.add_metric(["waiting"], waiting.count())
    metric.add_metric(["running"], OrmQ.objects.filter(lock__gt=now).count())
    yield metric
    oldest = waiting.aggregate(at=Min("lock"))["at"]
    yield _gauge(
        "pacslens_queue_oldest_waiting_age_seconds",
        "How long the oldest waiting task has waited for a worker (0: none)",
        (now - oldest).total_seconds() if oldest else 0,
    )
    yield _gauge(
        "pacslens_queue_failed_tasks", "Tasks django-q2 recorded as failed", Task.objects.filter(success=False).count()
    )


def disk() -> Iterator[Metric]:
    usage = shutil.disk_usage(settings.DATA_DIR)
    yield _gauge("pacslens_disk_free_bytes", "Free space under the data dir", usage.free)
    yield _gauge("pacslens_disk_total_bytes", "Size of the filesystem holding the data dir", usage.total)
    yield _gauge(
        "pacslens_disk_free_floor_bytes",
        "Below this the listener refuses new data (0xA700)",
        settings.DISK_FREE_FLOOR_MB * 2**20,
    )
    yield _gauge("pacslens_disk_free_warning_bytes", "Below this /healthz warns", settings.DISK_FREE_WARNING_MB * 2**20)


def heartbeats() -> Iterator[Metric]:
    now = timezone.now()
    metric = GaugeMetricFamily(
        "pacslens_heartbeat_age_seconds", "Seconds since each process last beat", labels=["role", "identity"]
    )
    for beat in Heartbeat.objects.order_by("role", "identity"):
        metric.add_metric([beat.role, beat.identity], (now - beat.beat_at).total_seconds())
    yield metric


def alerts() -> Iterator[Metric]:
    metric = GaugeMetricFamily(
        "pacslens_alerts_active", "Alert conditions active now, by condition", labels=["condition"]
    )
    for row in (
        AlertState.objects.filter(active=True, rule__enabled=True)
        .values("rule__condition")
        .annotate(n=Count("pk"))
        .order_by()
    ):
        metric.add_metric([row["rule__condition"]], row["n"])
    yield metric


# --- helpers ---------------------------------------------------------------------------------


def _bucket_counts(field: str, bounds: tuple[float, ...], *, as_duration: bool = False) -> dict:
    return {
        f"le_{index}": Count("pk", filter=Q(**{f"{field}__lte": timedelta(seconds=bound) if as_duration else bound}))
        for index, bound in enumerate(bounds)
    }


def _buckets(row: Mapping[str, Any], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    """Cumulative (upper bound, count) pairs as prometheus_client wants them, ending with +Inf."""
    return [(repr(bound), row[f"le_{index}"]) for index, bound in enumerate(bounds)] + [("+Inf", row["n"])]


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
