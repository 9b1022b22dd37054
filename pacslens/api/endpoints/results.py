"""Inference results: the triage audit (pacslens/staff/views/triage.py) as JSON.

Like the page, every read is an audit event recording the filters, never what was shown. The UI
shows it to superusers; through the API it takes the auditor role's `api.view_triage_audit`.
"""

from __future__ import annotations

from django.http import HttpRequest, QueryDict
from django.shortcuts import get_object_or_404
from ninja import Router

from pacslens.api import schemas
from pacslens.api.auth import require
from pacslens.api.cursor import cursor_page
from pacslens.api.problems import Problem, form_problems
from pacslens.staff.forms import TriageFilterForm
from results.models import InferenceResult
from routing.models import AuditAction, AuditEntry

router = Router(tags=["results"])
TRIAGE_AUDIT = ("api.view_triage_audit",)


@router.get("/results", response=schemas.ResultPage, summary="List inference results (triage audit)")
def result_list(
    request: HttpRequest,
    model: str | None = None,
    date_from: str | None = None,
    date_to: str | None = None,
    flag: str | None = None,
    score_min: str | None = None,
    score_max: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
):
    """Newest first; `model` is a model id, `flag` yes or no, scores between 0 and 1."""
    client = require(request, *TRIAGE_AUDIT)
    filters = {
        "model": model,
        "date_from": date_from,
        "date_to": date_to,
        "flag": flag,
        "score_min": score_min,
        "score_max": score_max,
    }
    data = QueryDict(mutable=True)
    data.update({k: v for k, v in filters.items() if v is not None})
    form = TriageFilterForm(data)
    if not form.is_valid():
        raise Problem(422, "The filters are not valid.", errors=form_problems(form))
    results = form.filter(InferenceResult.objects.select_related("superseded_by"))
    rows, next_cursor = cursor_page(results, field="created_at", cursor=cursor, limit=limit)
    AuditEntry.record(
        actor=client.actor,
        action=AuditAction.VIEW_AUDIT,
        detail=form.describe() + ("; next page" if cursor else ""),
        request=request,
    )
    next_url = None
    if next_cursor:
        query = data.copy()
        query["cursor"], query["limit"] = next_cursor, str(limit)
        next_url = request.build_absolute_uri(f"{request.path}?{query.urlencode()}")
    return {"items": [_row(r) for r in rows], "next_cursor": next_cursor, "next": next_url}


@router.get("/results/{int:result_id}", response=schemas.ResultRow, summary="One inference result (triage audit)")
def result_detail(request: HttpRequest, result_id: int):
    client = require(request, *TRIAGE_AUDIT)
    result = get_object_or_404(InferenceResult.objects.select_related("superseded_by"), pk=result_id)
    AuditEntry.record(
        actor=client.actor, action=AuditAction.VIEW_AUDIT, obj=result, detail="one result", request=request
    )
    return _row(result)


def _row(r: InferenceResult) -> dict:
    return {
        "id": r.pk,
        "created_at": r.created_at,
        "study_id": r.study_id,
        "model": r.model_name,
        "model_version": r.model_version,
        "model_sha256": r.model_sha256,
        "shadow": r.shadow,
        "status": r.status,
        "score": r.score,
        "flagged": r.flagged,
        "label": r.label,
        "supersedes": r.supersedes_id,
        "current": getattr(r, "superseded_by", None) is None,
    }
