"""Score monitoring: how each model's scores and flagged share move per day or week, and how a
version run in shadow agrees with the live one on the same studies.

A model whose share of flagged studies drifts (a scanner protocol changed, a new site's
studies, a broken preprocessing step) is wrong long before anyone notices a single miss; these
figures are what the models page, the triage audit page, /metrics and alerts read. Counted in
SQL (one grouped query with a conditional COUNT per score bin), so a chart of a year costs one
query. Only current (not superseded), succeeded results count.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from django.db.models import Count, Q, QuerySet
from django.db.models.functions import TruncDate, TruncWeek
from django.utils import timezone

from results.models import InferenceResult, ResultStatus

BINS = 10  # score histogram: [0, 0.1), [0.1, 0.2), ... [0.9, 1]; below 0 and above 1 in the end bins
PERIODS = ("day", "week")


@dataclass(frozen=True)
class ModelKey:
    """One model version, live or in shadow: the series a chart or metric shows."""

    name: str
    version: str
    shadow: bool

    def __str__(self) -> str:
        return f"{self.name} {self.version}" + (" (shadow)" if self.shadow else "")


@dataclass
class PeriodStats:
    """One day or week of one model version's scores."""

    start: dt.date
    count: int = 0
    flagged: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * BINS)

    @property
    def flagged_share(self) -> float | None:
        return self.flagged / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        """The score below which a share `q` of this period's scores lie, read from the histogram
        (linear within a bin): exact enough for a chart, and needs no per-row scan."""
        if not self.count:
            return None
        target = q * self.count
        seen = 0
        for index, n in enumerate(self.histogram):
            if n and seen + n >= target:
                return (index + (target - seen) / n) / BINS
            seen += n
        return 1.0


@dataclass(frozen=True)
class FlaggedShare:
    count: int
    flagged: int

    @property
    def share(self) -> float | None:
        return self.flagged / self.count if self.count else None


def scored_results() -> QuerySet[InferenceResult]:
    """The results monitoring counts: current and succeeded (a score and a flag)."""
    return InferenceResult.objects.current().filter(status=ResultStatus.SUCCEEDED, score__isnull=False)


def score_distribution(
    *,
    period: str = "day",
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    model_name: str | None = None,
) -> dict[ModelKey, list[PeriodStats]]:
    """Per model version (live and shadow apart), one PeriodStats per day or week with results,
    oldest first. `since` defaults to 30 days (day) or 12 weeks (week) ago."""
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}")
    now = timezone.now()
    since = since or now - (dt.timedelta(days=30) if period == "day" else dt.timedelta(weeks=12))
    rows = scored_results().filter(created_at__gte=since)
    if until is not None:
        rows = rows.filter(created_at__lt=until)
    if model_name is not None:
        rows = rows.filter(model_name=model_name)
    truncate = TruncDate if period == "day" else TruncWeek
    grouped = (
        rows.annotate(start=truncate("created_at", tzinfo=timezone.get_current_timezone()))
        .values("model_name", "model_version", "shadow", "start")
        .annotate(n=Count("pk"), flagged_n=Count("pk", filter=Q(flagged=True)), **_bin_counts())
        .order_by("model_name", "model_version", "shadow", "start")
    )
    series: dict[ModelKey, list[PeriodStats]] = {}
    for row in grouped:
        start = row["start"].date() if isinstance(row["start"], dt.datetime) else row["start"]
        stats = PeriodStats(
            start=start,
            count=row["n"],
            flagged=row["flagged_n"],
            histogram=[cast(dict, row)[f"bin_{i}"] for i in range(BINS)],
        )
        series.setdefault(ModelKey(row["model_name"], row["model_version"], row["shadow"]), []).append(stats)
    return series


def flagged_share(
    *,
    model_name: str,
    model_version: str | None = None,
    since: dt.datetime,
    until: dt.datetime | None = None,
    shadow: bool = False,
) -> FlaggedShare:
    """How many scored results a model (version) had in [since, until) and how many it flagged:
    what an alert on the flagged share compares with its band."""
    rows = scored_results().filter(model_name=model_name, shadow=shadow, created_at__gte=since)
    if model_version is not None:
        rows = rows.filter(model_version=model_version)
    if until is not None:
        rows = rows.filter(created_at__lt=until)
    counts = rows.aggregate(n=Count("pk"), flagged_n=Count("pk", filter=Q(flagged=True)))
    return FlaggedShare(count=counts["n"], flagged=counts["flagged_n"])


@dataclass
class Agreement:
    """How a shadow model version's flags agree with a live one's on the studies both read."""

    live: ModelKey
    shadow: ModelKey
    both: int = 0
    live_only: int = 0
    shadow_only: int = 0
    neither: int = 0

    @property
    def studies(self) -> int:
        return self.both + self.live_only + self.shadow_only + self.neither

    @property
    def agreement(self) -> float | None:
        return (self.both + self.neither) / self.studies if self.studies else None


def model_agreement(*, since: dt.datetime | None = None) -> list[Agreement]:
    """Per (live version, shadow version) pair, on each study where both have a current scored
    result: both flagged, only the live one, only the shadow one, neither."""
    rows = scored_results()
    if since is not None:
        rows = rows.filter(created_at__gte=since)
    with_shadow = rows.filter(shadow=True).values("study_id")
    by_study: dict[int, list[tuple[ModelKey, bool]]] = {}
    for study_id, name, version, is_shadow, flagged in (
        rows.filter(study_id__in=with_shadow)
        .values_list("study_id", "model_name", "model_version", "shadow", "flagged")
        .order_by()
    ):
        by_study.setdefault(study_id, []).append((ModelKey(name, version, is_shadow), bool(flagged)))
    pairs: dict[tuple[ModelKey, ModelKey], Agreement] = {}
    for results in by_study.values():
        for live, live_flag in _of(results, shadow=False):
            for shadow, shadow_flag in _of(results, shadow=True):
                tally = pairs.setdefault((live, shadow), Agreement(live=live, shadow=shadow))
                if live_flag and shadow_flag:
                    tally.both += 1
                elif live_flag:
                    tally.live_only += 1
                elif shadow_flag:
                    tally.shadow_only += 1
                else:
                    tally.neither += 1
    return sorted(pairs.values(), key=lambda a: (str(a.live), str(a.shadow)))


def _of(results: Iterable[tuple[ModelKey, bool]], *, shadow: bool) -> list[tuple[ModelKey, bool]]:
    return [(key, flag) for key, flag in results if key.shadow is shadow]


def _bin_counts() -> dict:
    counts = {}
    for i in range(BINS):
        low, high = Q(score__gte=i / BINS), Q(score__lt=(i + 1) / BINS)
        if i == 0:
            low = Q()  # below 0 counts in the first bin
        if i == BINS - 1:
            high = Q()  # 1.0 and above count in the last bin
        counts[f"bin_{i}"] = Count("pk", filter=low & high)
    return counts
