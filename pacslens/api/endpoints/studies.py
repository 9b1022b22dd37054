"""Studies: the list with the UI's filters, one study's status, and the study page's actions."""

from __future__ import annotations

from django.db.models import Exists, OuterRef
from django.http import HttpRequest, QueryDict
from django.shortcuts import get_object_or_404
from ninja import Router

from pacslens.api import schemas
from pacslens.api.auth import require
from pacslens.api.cursor import cursor_page
from pacslens.api.problems import Problem, form_problems
from pacslens.ops.study_status import study_status_data
from pacslens.staff.forms import StudyFilterForm
from results.deliver import ledger
from results.models import InferenceResult
from routing.completion import study_request_rerun
from routing.models import AuditAction, AuditEntry, Study

router = Router(tags=["studies"])
VIEW = ("routing.view_study",)
# As the study page's buttons (pacslens/staff/views/study_actions.py).
RERUN = ("routing.view_study", "routing.rerun_inference")
REDELIVER = ("routing.view_study", "results.retry_delivery")


@router.get("/studies", response=schemas.StudyPage, summary="List studies, newest first")
def study_list(
    request: HttpRequest,
    q: str | None = None,
    state: str | None = None,
    received_from: str | None = None,
    received_to: str | None = None,
    calling_ae: str | None = None,
    modality: str | None = None,
    flag: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
):
    """The studies page's filters (`q` is an accession number or Study Instance UID; dates are
    YYYY-MM-DD; `flag` is yes or no). Pages follow `next_cursor`, stable while studies arrive."""
    require(request, *VIEW)
    filters = {
        "q": q,
        "state": state,
        "received_from": received_from,
        "received_to": received_to,
        "calling_ae": calling_ae,
        "modality": modality,
        "flag": flag,
    }
    data = QueryDict(mutable=True)
    data.update({k: v for k, v in filters.items() if v is not None})
    form = StudyFilterForm(data)
    if not form.is_valid():
        raise Problem(422, "The filters are not valid.", errors=form_problems(form))
    flagged = InferenceResult.objects.current().filter(study=OuterRef("pk"), flagged=True)
    studies = form.filter(Study.objects.all()).annotate(flagged=Exists(flagged))
    rows, next_cursor = cursor_page(studies, field="first_received_at", cursor=cursor, limit=limit)
    items = [_summary(request, study) for study in rows]
    next_url = None
    if next_cursor:
        query = data.copy()
        query["cursor"], query["limit"] = next_cursor, str(limit)
        next_url = request.build_absolute_uri(f"{request.path}?{query.urlencode()}")
    return {"items": items, "next_cursor": next_cursor, "next": next_url}


@router.get(
    "/studies/{int:study_id}",
    response=schemas.StudyStatus,
    summary="One study: series, timeline, routing, results, deliveries",
)
def study_detail(request: HttpRequest, study_id: int):
    """The same document as `manage.py study_status --json` (one serializer for both)."""
    require(request, *VIEW)
    return study_status_data(get_object_or_404(Study, pk=study_id))


@router.post("/studies/{int:study_id}/rerun", response={202: schemas.ActionOutcome}, summary="Re-run inference")
def study_rerun(request: HttpRequest, study_id: int):
    """Route and infer the study again; the new result supersedes the current one. 409 while
    the pipeline is still working on the study."""
    client = require(request, *RERUN)
    study = get_object_or_404(Study, pk=study_id)
    if not study_request_rerun(study=study, actor=client.actor):
        raise Problem(
            409, f"The study is {study.get_state_display().lower()}: wait until the pipeline is done with it."
        )
    AuditEntry.record(actor=client.actor, action=AuditAction.RERUN, obj=study, request=request)
    return 202, {"detail": "Inference will run again; the new result will supersede the current one."}


@router.post("/studies/{int:study_id}/redeliver", response={202: schemas.ActionOutcome}, summary="Re-deliver a study")
def study_redeliver(request: HttpRequest, study_id: int, destination: str | None = None):
    """Send the study's current results again (to every destination, or the one named), with the
    same idempotency keys. 409 when there is nothing to re-deliver."""
    client = require(request, *REDELIVER)
    study = get_object_or_404(Study, pk=study_id)
    count, ids = ledger.study_redeliver(study=study, actor=client.actor, destination_name=destination)
    AuditEntry.record(
        actor=client.actor,
        action=AuditAction.RETRY,
        obj=study,
        detail=f"re-deliver study: {count} of {len(ids)} deliveries queued",
        request=request,
    )
    if not count:
        raise Problem(409, "Nothing to re-deliver: no delivered or failed delivery of a current result.")
    return 202, {"detail": f"{count} deliver{'y' if count == 1 else 'ies'} queued again.", "queued": count, "ids": ids}


def _summary(request: HttpRequest, study: Study) -> dict:
    return {
        "id": study.pk,
        "study_instance_uid": study.study_instance_uid,
        "state": study.state,
        "priority": study.get_priority_display().lower(),
        "accession_number": study.accession_number,
        "modalities": [m for m in study.modalities.split("\\") if m],
        "sending_ae_title": study.calling_ae_title,
        "first_received_at": study.first_received_at,
        "last_received_at": study.last_received_at,
        "completed_at": study.completed_at,
        "flagged": study.flagged,  # type: ignore[attr-defined]  # annotated above
        "url": request.build_absolute_uri(f"{request.path.rstrip('/')}/{study.pk}"),
    }
