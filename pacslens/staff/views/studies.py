"""Studies: a filterable, sortable, paginated table, and one study's whole story."""

from __future__ import annotations

from datetime import datetime

from django.core.paginator import Paginator
from django.db.models import Count
from django.http import HttpResponse
from django.shortcuts import get_object_or_404

from pacslens.staff.dashboard_data import duration_text
from pacslens.staff.forms import StudyFilterForm
from pacslens.staff.views.access import render_page, staff_view
from results.models import Delivery, InferenceResult
from routing.models import Study, StudyState
from routing.pull.failed import retrieves_failed

PAGE_SIZE = 25
# States in which the study page keeps refreshing itself: something is still going to happen.
# Not INFERRED: its deliveries are written with that state and move it on, so it has nothing to deliver.
WORKING_STATES = {
    StudyState.RECEIVING,
    StudyState.COMPLETE,
    StudyState.ROUTED,
    StudyState.INFERRING,
    StudyState.DELIVERING,
}


@staff_view("routing.view_study")
def study_list(request) -> HttpResponse:
    form = StudyFilterForm(request.GET)
    studies = form.filter(Study.objects.all())
    page = Paginator(studies, PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    sort = request.GET.get("sort", "-received")
    without_sort = query.copy()
    without_sort.pop("sort", None)
    context = {
        "nav": "studies",
        "form": form,
        "page": page,
        "query": query.urlencode(),
        "sort": sort,
        "sort_query": without_sort.urlencode(),
        **_findings([s.pk for s in page]),
    }
    if not request.htmx and request.user.has_perm("routing.view_studyretrieve"):
        context["not_fetched"] = retrieves_failed()[:50]  # studies a PACS holds that we could not fetch
    return render_page(request, "studies/list.html", context, fragment="table")


@staff_view("routing.view_study")
def study_detail(request, pk: int) -> HttpResponse:
    study = get_object_or_404(Study.objects.select_related("sender"), pk=pk)
    context = {"nav": "studies", "study": study, **study_story(study)}
    return render_page(request, "studies/detail.html", context, fragment="live")


def study_story(study: Study) -> dict:
    """Everything the detail page shows, in the order it shows it."""
    events = list(study.events.all())
    timeline = []
    previous: datetime | None = None
    for event in events:
        delta = (event.at - previous).total_seconds() if previous else None
        timeline.append({"event": event, "delta": _delta_text(delta)})
        previous = event.at
    results = list(study.inference_results.select_related("model", "supersedes").order_by("-created_at", "-id"))
    superseded = {r.supersedes_id for r in results if r.supersedes_id}
    deliveries = list(
        Delivery.objects.filter(study=study)
        .select_related("destination", "result")
        .prefetch_related("attempt_log")
        .order_by("created_at", "id")
    )
    for delivery in deliveries:
        delivery.attempt_rows = [  # type: ignore[attr-defined]  # ad-hoc attribute for the template
            {"attempt": a, "took": duration_text((a.ended_at - a.started_at).total_seconds())}
            for a in delivery.attempt_log.all()
        ]
    return {
        "timeline": timeline,
        "series": list(study.series.annotate(instance_total=Count("instances")).order_by("series_number", "id")),
        "instance_count": study.instances.count(),
        "results": [{"result": r, "current": r.pk not in superseded} for r in results],
        "deliveries": deliveries,
        "decision": study.routing_decision(),
        "working": study.state in WORKING_STATES or any(d.state in ("pending", "in_flight") for d in deliveries),
    }


def _findings(study_ids: list[int]) -> dict[str, set[int]]:
    """Which studies have a current live result that is flagged, and which one at all (else: no finding yet);
    shadow results are not findings."""
    rows = InferenceResult.objects.current().live().filter(study_id__in=study_ids).values_list("study_id", "flagged")
    return {
        "flagged_ids": {study_id for study_id, flagged in rows if flagged},
        "scored_ids": {study_id for study_id, flagged in rows if flagged is not None},
    }


def _delta_text(seconds: float | None) -> str:
    return "" if seconds is None else "+" + duration_text(seconds)
