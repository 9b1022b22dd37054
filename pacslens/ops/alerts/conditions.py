"""What each alert condition watches: `firing(rule)` is every subject for which the rule's
condition holds now, each with the alert's title and text.

Subjects are what an alert is about (a destination, a poll source, a model, a process role):
the condition starts and clears per subject. Texts carry names, counts and times only, never
patient data and never text a peer sent us (an HL7 ACK or an HTTP body may quote a patient).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property

from django.db.models import Count, Max, Q
from django.utils import timezone

from pacslens.ops.health import check_disk, check_heartbeat, check_workers
from results.models import (
    AlertCondition,
    AlertRule,
    Delivery,
    DeliveryState,
    Destination,
    InferenceResult,
    ResultStatus,
)
from results.monitoring import flagged_share
from routing.models import Study, StudyRetrieve
from routing.pull.failed import sources_failing

# A sender silent for longer than this is silent, however its expected hours add up.
SILENCE_LOOKBACK = timedelta(days=31)


@dataclass(frozen=True)
class Firing:
    title: str
    text: str


class Evaluation:
    """One evaluation of every rule: the time, and figures several rules share, read once."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or timezone.now()

    @cached_property
    def last_received_by_sender(self) -> dict[str, datetime]:
        # One scan for every sender_silent rule (calling_ae_title has no index: the receive
        # path updates studies per instance, and an index there would cost on every one).
        senders = AlertRule.objects.filter(enabled=True, condition=AlertCondition.SENDER_SILENT).values("ae_title")
        return dict(
            Study.objects.filter(calling_ae_title__in=senders)
            .values("calling_ae_title")
            .annotate(at=Max("last_received_at"))
            .values_list("calling_ae_title", "at")
        )


def firing(rule: AlertRule, *, evaluation: Evaluation | None = None) -> dict[str, Firing]:
    """Subject -> what to say, for every subject the rule's condition holds for now."""
    return CONDITIONS[rule.condition](rule, evaluation or Evaluation())


def clear_text(rule: AlertRule, subject: str) -> Firing:
    what = AlertCondition(rule.condition).label
    return Firing(
        title=f"Resolved: {CLEAR_TITLES.get(rule.condition, what)}{f' ({subject})' if subject else ''}",
        text=f"The condition watched by alert rule '{rule.name}' no longer holds: {what.lower()}.",
    )


def failure_queue(rule: AlertRule, run: Evaluation) -> dict[str, Firing]:
    rows = (
        Delivery.objects.filter(state=DeliveryState.FAILED)
        .values("destination__name", "last_error_class")
        .annotate(n=Count("pk"))
        .order_by()
    )
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        counts.setdefault(row["destination__name"], {})[row["last_error_class"] or "unclassified"] = row["n"]
    total = sum(sum(by_class.values()) for by_class in counts.values())
    overall = ", ".join(f"{name}: {sum(c.values())}" for name, c in sorted(counts.items()))
    out = {}
    for name, by_class in counts.items():
        n = sum(by_class.values())
        classes = ", ".join(f"{count} {error_class}" for error_class, count in sorted(by_class.items()))
        out[name] = Firing(
            title=f"{n} deliver{'y' if n == 1 else 'ies'} to {name} in the failure queue",
            text=f"Deliveries to destination {name} failed for good ({classes}). "
            f"The failure queue holds {total} in all ({overall}). Retry or discard them on the Failure queue page.",
        )
    return out


def circuit_open(rule: AlertRule, run: Evaluation) -> dict[str, Firing]:
    return {
        d.name: Firing(
            title=f"Circuit breaker of {d.name} open",
            text=f"Destination {d.name} ({d.get_kind_display()}) failed {d.consecutive_failures} times in a row; "
            f"deliveries to it pause until {timezone.localtime(d.circuit_open_until):%Y-%m-%d %H:%M %Z} and "
            "then try again. Check the destination with its Test button on the Endpoints page.",
        )
        for d in Destination.objects.filter(enabled=True, circuit_open_until__gt=run.now)
    }


def pull_failed(rule: AlertRule, run: Evaluation) -> dict[str, Firing]:
    failed = dict(
        StudyRetrieve.objects.filter(state=StudyRetrieve.State.FAILED)
        .values_list("source__name")
        .annotate(n=Count("pk"))
        .values_list("source__name", "n")
    )
    polls_failing = {source.name: source.consecutive_failures for source in sources_failing()}
    out = {}
    for name in sorted(set(failed) | set(polls_failing)):
        parts = []
        if failed.get(name):
            n = failed[name]
            parts.append(f"{n} retrieve{'s' if n != 1 else ''} from poll source {name} failed for good")
        if polls_failing.get(name):
            parts.append(f"the last {polls_failing[name]} polls of {name} failed")
        out[name] = Firing(
            title=f"Pull from {name} failing",
            text="; ".join(parts).capitalize() + ". Retry or discard them on the Failure queue page.",
        )
    return out


def sender_silent(rule: AlertRule, run: Evaluation) -> dict[str, Firing]:
    last = run.last_received_by_sender.get(rule.ae_title)
    since = max(last or rule.created_at, run.now - SILENCE_LOOKBACK)
    silent = expected_seconds_between(rule, since, run.now)
    if rule.hours is None or silent < rule.hours * 3600:
        return {}
    received = f"last received {timezone.localtime(last):%Y-%m-%d %H:%M %Z}" if last else "nothing received yet"
    return {
        rule.ae_title: Firing(
            title=f"Nothing received from {rule.ae_title} for {rule.hours:g} h of its expected hours",
            text=f"Sender {rule.ae_title} is expected to send on {rule.weekdays} "
            f"{_window_text(rule)}; {received}. Check the modality or PACS and its forwarding rules.",
        )
    }


def disk_low(rule: AlertRule, run: Evaluation) -> dict[str, Firing]:
    check = check_disk()
    if check["status"] == "ok":
        return {}
    return {
        "disk": Firing(
            title=f"Disk space low: {check['free_mb']} MB free",
            text=f"{check['free_mb']} MB free in the data directory (warning level {check['warning_mb']} MB, "
            f"floor {check['floor_mb']} MB): {check.get('message', '')}.",
        )
    }


def heartbeat_missing(rule: AlertRule, run: Evaluation) -> dict[str, Firing]:
    out = {}
    for role, check in (("listener", check_heartbeat("listener")), ("workers", check_workers())):
        if check["status"] == "down":
            out[role] = Firing(title=f"No {role} heartbeat", text=f"{check['message']}. Is the service running?")
    return out


def model_failure_rate(rule: AlertRule, run: Evaluation) -> dict[str, Firing]:
    out = {}
    for name, total, failed in _model_counts(rule, run.now, count=Q(status=ResultStatus.FAILED)):
        rate = 100.0 * failed / total
        if total >= rule.min_results and rule.threshold_percent is not None and rate > rule.threshold_percent:
            out[name] = Firing(
                title=f"Model {name} failing: {rate:.0f} % of results",
                text=f"{failed} of {total} results of model {name} in the last {rule.window_hours:g} h failed "
                f"(alert above {rule.threshold_percent:g} %). The study pages give each failure's reason.",
            )
    return out


def flag_share(rule: AlertRule, run: Evaluation) -> dict[str, Firing]:
    name = rule.model_name
    counts = flagged_share(model_name=name, since=run.now - timedelta(hours=rule.window_hours))
    share = 100.0 * (counts.share or 0.0)
    low = rule.min_share_percent is not None and share < rule.min_share_percent
    high = rule.max_share_percent is not None and share > rule.max_share_percent
    if counts.count < max(rule.min_results, 1) or not (low or high):
        return {}
    band = f"{_percent(rule.min_share_percent, '0')}–{_percent(rule.max_share_percent, '100')} %"
    return {
        name: Firing(
            title=f"Model {name} flags {share:.0f} % of studies ({'below' if low else 'above'} its band)",
            text=f"{counts.flagged} of {counts.count} scored results of model {name} in the last "
            f"{rule.window_hours:g} h were flagged: {share:.1f} %, outside the expected band of {band}. A changed "
            "scanner protocol, a routing rule sending other studies, or a model problem can cause this.",
        )
    }


CONDITIONS: dict[str, Callable[[AlertRule, Evaluation], dict[str, Firing]]] = {
    AlertCondition.FAILURE_QUEUE: failure_queue,
    AlertCondition.CIRCUIT_OPEN: circuit_open,
    AlertCondition.PULL_FAILED: pull_failed,
    AlertCondition.SENDER_SILENT: sender_silent,
    AlertCondition.DISK_LOW: disk_low,
    AlertCondition.HEARTBEAT_MISSING: heartbeat_missing,
    AlertCondition.MODEL_FAILURE_RATE: model_failure_rate,
    AlertCondition.FLAG_SHARE: flag_share,
}
CLEAR_TITLES: dict[str, str] = {
    AlertCondition.FAILURE_QUEUE: "failure queue empty",
    AlertCondition.CIRCUIT_OPEN: "circuit breaker closed again",
    AlertCondition.PULL_FAILED: "pull working again",
    AlertCondition.SENDER_SILENT: "sender sending again",
    AlertCondition.DISK_LOW: "disk space back above the warning level",
    AlertCondition.HEARTBEAT_MISSING: "heartbeat back",
    AlertCondition.MODEL_FAILURE_RATE: "model failure rate back below the threshold",
    AlertCondition.FLAG_SHARE: "model's flagged share back in its band",
}


def expected_seconds_between(rule: AlertRule, start: datetime, end: datetime) -> float:
    """Seconds of [start, end] that fall in the rule's expected hours (site time zone)."""
    if end <= start:
        return 0.0
    days = rule.weekday_numbers
    begin, until = rule.expected_window()
    total = 0.0
    day = timezone.localtime(start).date()
    last_day = timezone.localtime(end).date()
    zone = timezone.get_current_timezone()
    while day <= last_day:
        if day.weekday() in days:
            window_start = datetime.combine(day, begin, tzinfo=zone)
            window_end = datetime.combine(day, until, tzinfo=zone)
            overlap = (min(window_end, end) - max(window_start, start)).total_seconds()
            total += max(overlap, 0.0)
        day += timedelta(days=1)
    return total


def _model_counts(rule: AlertRule, now: datetime, *, count: Q) -> list[tuple[str, int, int]]:
    """(model name, results in the window, of which matching `count`), current results only."""
    results = InferenceResult.objects.current().filter(created_at__gte=now - timedelta(hours=rule.window_hours))
    if rule.model_name:
        results = results.filter(model_name=rule.model_name)
    rows = results.values("model_name").annotate(total=Count("pk"), hits=Count("pk", filter=count)).order_by()
    return [(row["model_name"], row["total"], row["hits"]) for row in rows if row["total"]]


def _window_text(rule: AlertRule) -> str:
    begin, until = rule.expected_window()
    if rule.active_from is None and rule.active_to is None:
        return "all day"
    return f"{begin:%H:%M}–{until:%H:%M}"


def _percent(value: float | None, default: str) -> str:
    return default if value is None else f"{value:g}"
