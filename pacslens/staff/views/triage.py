"""The triage-score audit (superusers): every inference result, filterable, exportable as CSV.

Opening the page (full page or htmx fragment, any page of it) and exporting are audit events;
the audit row records the filters and page, never the accession numbers shown.
"""

from __future__ import annotations

import csv

from django.core.paginator import Paginator
from django.http import HttpResponse, StreamingHttpResponse
from django.utils import timezone

from pacslens.staff.forms import TriageFilterForm
from pacslens.staff.score_charts import score_charts
from pacslens.staff.views.access import actor, render_page, staff_view
from results.models import InferenceResult
from routing.models import AuditAction, AuditEntry

PAGE_SIZE = 50
CSV_COLUMNS = [
    "result_id",
    "created_at",
    "model",
    "model_version",
    "model_sha256",
    "shadow",
    "status",
    "score",
    "flagged",
    "label",
    "study_id",
    "accession_number",
    "supersedes",
    "superseded_by",
]


@staff_view(superuser=True)
def triage_audit(request) -> HttpResponse:
    form = TriageFilterForm(request.GET)
    results = form.filter(_results())
    page = Paginator(results, PAGE_SIZE).get_page(request.GET.get("page"))
    # Every rendering shows results, so every one is audited: a page flip or an htmx fragment too.
    detail = form.describe() + (f"; page {page.number}" if page.number > 1 else "")
    AuditEntry.record(actor=actor(request), action=AuditAction.VIEW_AUDIT, detail=detail, request=request)
    query = request.GET.copy()
    query.pop("page", None)
    context = {"nav": "triage", "form": form, "page": page, "query": query.urlencode()}
    if not getattr(request, "htmx", None):
        chosen = form.cleaned_data.get("model") if form.is_valid() else None
        context |= score_charts(period=request.GET.get("period", "day"), model_name=chosen.name if chosen else None)
    return render_page(request, "results/triage.html", context, fragment="table")


@staff_view(superuser=True)
def triage_audit_csv(request) -> StreamingHttpResponse | HttpResponse:
    form = TriageFilterForm(request.GET)
    if not form.is_valid():
        # Exporting everything because a date was mistyped would hand out more than was asked for.
        text = "The filter is not valid, nothing was exported: " + "; ".join(form.error_lines())
        return HttpResponse(text, status=400, content_type="text/plain; charset=utf-8")
    results = form.filter(_results())
    AuditEntry.record(
        actor=actor(request),
        action=AuditAction.EXPORT_AUDIT,
        detail=f"{form.describe()}; {results.count()} rows",
        request=request,
    )
    response = StreamingHttpResponse(
        _csv_rows(results.iterator(chunk_size=500)), content_type="text/csv; charset=utf-8"
    )
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    response["Content-Disposition"] = f'attachment; filename="triage-audit-{stamp}.csv"'
    return response


def _results():
    return InferenceResult.objects.select_related("study", "model", "superseded_by").order_by("-created_at", "-id")


class _Echo:
    def write(self, value: str) -> str:
        return value


def _csv_rows(results):
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_COLUMNS)
    for r in results:
        superseded_by = getattr(r, "superseded_by", None)
        yield writer.writerow(
            [
                r.pk,
                r.created_at.isoformat(),
                r.model_name,
                r.model_version,
                r.model_sha256,
                "yes" if r.shadow else "no",
                r.status,
                "" if r.score is None else f"{r.score:.6f}",
                "" if r.flagged is None else ("yes" if r.flagged else "no"),
                r.label,
                r.study_id,
                _csv_safe(r.study.accession_number),
                r.supersedes_id or "",
                superseded_by.pk if superseded_by else "",
            ]
        )


def _csv_safe(value: str) -> str:
    # A cell starting with = + - @ is a formula to a spreadsheet: never let received data become one.
    return "'" + value if value[:1] in ("=", "+", "-", "@") else value
