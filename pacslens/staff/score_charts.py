"""Score charts for the models and triage audit pages: server-rendered SVG, no JavaScript.

`score_charts(period=...)` lays out one chart per model version (live and shadow apart) from
results/monitoring.py: per day or week a bar for the share flagged and a whisker for the
middle 80 % of scores with a dot at the median, all on one 0-1 scale. The template
(templates/results/score_charts.html) only draws the numbers computed here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from django.utils import timezone

from results.monitoring import ModelKey, PeriodStats, model_agreement, score_distribution

WIDTH, HEIGHT = 640, 170
LEFT, RIGHT, TOP, BOTTOM = 34, 8, 10, 22
DAYS = 30
WEEKS = 12


@dataclass
class Column:
    x: float
    width: float
    centre: float
    bar_y: float
    bar_height: float
    p10_y: float | None
    p50_y: float | None
    p90_y: float | None
    tip: str


@dataclass
class Chart:
    model: ModelKey
    count: int
    flagged: int
    columns: list[Column] = field(default_factory=list)
    first: str = ""
    last: str = ""

    @property
    def share(self) -> float | None:
        return self.flagged / self.count if self.count else None


def score_charts(*, period: str = "day", model_name: str | None = None) -> dict:
    """Template context: the charts, the axis geometry, the period choice and the agreement."""
    period = period if period in ("day", "week") else "day"
    starts = _period_starts(period)
    since = dt.datetime.combine(starts[0], dt.time.min, tzinfo=timezone.get_current_timezone())
    series = score_distribution(period=period, since=since, model_name=model_name)
    charts = [_chart(key, stats, starts) for key, stats in series.items()]
    return {
        "charts": charts,
        "period": period,
        "width": WIDTH,
        "height": HEIGHT,
        "plot": {"left": LEFT, "right": WIDTH - RIGHT, "top": TOP, "bottom": HEIGHT - BOTTOM},
        "gridlines": [{"y": _y(v), "label": f"{v:g}"} for v in (0.0, 0.5, 1.0)],
        "agreements": model_agreement(since=since),
        "span": f"last {DAYS} days" if period == "day" else f"last {WEEKS} weeks",
    }


def _chart(key: ModelKey, stats: list[PeriodStats], starts: list[dt.date]) -> Chart:
    by_start = {s.start: s for s in stats}
    chart = Chart(model=key, count=sum(s.count for s in stats), flagged=sum(s.flagged for s in stats))
    step = (WIDTH - LEFT - RIGHT) / len(starts)
    for index, start in enumerate(starts):
        period = by_start.get(start) or PeriodStats(start=start)
        share = period.flagged_share
        x = LEFT + index * step
        tip = f"{start:%Y-%m-%d}: no result"
        if period.count:
            tip = (
                f"{start:%Y-%m-%d}: {period.count} result{'s' if period.count != 1 else ''}, "
                f"{period.flagged} flagged ({share:.0%}), median score {period.quantile(0.5):.2f}"
            )
        chart.columns.append(
            Column(
                x=round(x + step * 0.15, 1),
                width=round(step * 0.7, 1),
                centre=round(x + step / 2, 1),
                bar_y=_y(share or 0.0),
                bar_height=round(_y(0.0) - _y(share or 0.0), 1),
                p10_y=_maybe_y(period.quantile(0.1)),
                p50_y=_maybe_y(period.quantile(0.5)),
                p90_y=_maybe_y(period.quantile(0.9)),
                tip=tip,
            )
        )
    chart.first, chart.last = f"{starts[0]:%Y-%m-%d}", f"{starts[-1]:%Y-%m-%d}"
    return chart


def _period_starts(period: str) -> list[dt.date]:
    today = timezone.localdate()
    if period == "day":
        return [today - dt.timedelta(days=n) for n in range(DAYS - 1, -1, -1)]
    monday = today - dt.timedelta(days=today.weekday())
    return [monday - dt.timedelta(weeks=n) for n in range(WEEKS - 1, -1, -1)]


def _y(value: float) -> float:
    value = min(max(value, 0.0), 1.0)
    return round(TOP + (1.0 - value) * (HEIGHT - TOP - BOTTOM), 1)


def _maybe_y(value: float | None) -> float | None:
    return None if value is None else _y(value)
