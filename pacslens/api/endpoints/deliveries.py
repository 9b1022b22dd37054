"""The failure queue: deliveries (list, retry, discard with a reason) and failed retrieves."""

from __future__ import annotations

from django.db.models import QuerySet
from django.http import HttpRequest
from django.shortcuts import get_object_or_404
from ninja import Router

from pacslens.api import schemas
from pacslens.api.auth import require
from pacslens.api.problems import Problem, form_problems
from pacslens.staff.forms import DiscardForm
from results.deliver.ledger import delivery_discard, delivery_retry
from results.models import Delivery, DeliveryState, ErrorClass
from routing.models import AuditAction, AuditEntry, PollSource, StudyRetrieve
from routing.pull.failed import retrieve_discard, retrieve_retry, source_poll_now, source_stop, sources_failing

router = Router(tags=["failure queue"])
# As the failure queue's views (pacslens/staff/views/failures.py).
VIEW = ("results.view_delivery",)
RETRY = ("results.view_delivery", "results.retry_delivery")
DISCARD = ("results.view_delivery", "results.discard_delivery")
# As the failure queue's retrieve section (pacslens/staff/views/retrieves.py).
RETRIEVE_VIEW = ("routing.view_studyretrieve",)
RETRIEVE_RETRY = ("routing.view_studyretrieve", "routing.retry_studyretrieve")
RETRIEVE_DISCARD = ("routing.view_studyretrieve", "routing.discard_studyretrieve")
# Its failing poll sources: Poll now as a retry, Stop polling as the source's change.
SOURCE_POLL_NOW = ("routing.view_studyretrieve", "routing.retry_studyretrieve")
SOURCE_STOP = ("routing.change_pollsource",)
MAX_ROWS = 500


@router.get("/deliveries", response=list[schemas.DeliveryRow], summary="List deliveries (the failure queue)")
def delivery_list(
    request: HttpRequest,
    state: str = DeliveryState.FAILED,
    destination: int | None = None,
    error_class: str | None = None,
    study: int | None = None,
):
    """Deliveries in `state` (failed by default), oldest first, at most 500."""
    require(request, *VIEW)
    if state not in DeliveryState.values:
        raise Problem(422, "Unknown delivery state.", errors=[("state", f"One of {', '.join(DeliveryState.values)}.")])
    if error_class is not None and error_class not in ErrorClass.values:
        raise Problem(422, "Unknown error class.", errors=[("error_class", f"One of {', '.join(ErrorClass.values)}.")])
    rows: QuerySet[Delivery] = Delivery.objects.filter(state=state).select_related("destination")
    if destination is not None:
        rows = rows.filter(destination_id=destination)
    if error_class:
        rows = rows.filter(last_error_class=error_class)
    if study is not None:
        rows = rows.filter(study_id=study)
    return [_row(d) for d in rows.order_by("created_at", "pk")[:MAX_ROWS]]


@router.post("/deliveries/retry", response={202: schemas.ActionOutcome}, summary="Retry failed deliveries")
def deliveries_retry(request: HttpRequest, body: schemas.RetryIn):
    """Every failed delivery of one `destination`, or the failed ones among `deliveries` (ids).
    Each goes back in the queue with its idempotency key; each is audited."""
    client = require(request, *RETRY)
    failed = Delivery.objects.filter(state=DeliveryState.FAILED)
    if body.destination is not None:
        rows, scope = failed.filter(destination_id=body.destination), "all of a destination"
    elif body.deliveries:
        rows, scope = failed.filter(pk__in=body.deliveries), "selected"
    else:
        raise Problem(
            422, "Name a destination or deliveries.", errors=[("destination", "Give destination or deliveries.")]
        )
    ids = list(rows.values_list("pk", flat=True))
    count = _retry(request, ids, client.actor, scope)
    return 202, {"detail": f"{count} deliver{'y' if count == 1 else 'ies'} queued again.", "queued": count, "ids": ids}


@router.post(
    "/deliveries/{int:delivery_id}/retry", response={202: schemas.ActionOutcome}, summary="Retry one failed delivery"
)
def delivery_retry_one(request: HttpRequest, delivery_id: int):
    client = require(request, *RETRY)
    delivery = get_object_or_404(Delivery, pk=delivery_id)
    if delivery.state != DeliveryState.FAILED:
        raise Problem(409, f"The delivery is {delivery.get_state_display().lower()}, not failed: nothing to retry.")
    count = _retry(request, [delivery.pk], client.actor, "one")
    return 202, {"detail": f"{count} delivery queued again.", "queued": count, "ids": [delivery.pk]}


@router.post(
    "/deliveries/{int:delivery_id}/discard", response=schemas.ActionOutcome, summary="Discard a failed delivery"
)
def delivery_discard_one(request: HttpRequest, delivery_id: int, body: schemas.DiscardIn):
    """Give up on a failed (or pending) delivery; the reason is required and audited."""
    client = require(request, *DISCARD)
    delivery = get_object_or_404(Delivery.objects.select_related("destination", "study"), pk=delivery_id)
    form = DiscardForm({"reason": body.reason})
    if not form.is_valid():
        raise Problem(422, "A reason is required to discard a delivery.", errors=form_problems(form))
    reason = form.cleaned_data["reason"]
    if not delivery_discard(delivery=delivery, actor=client.actor, reason=reason):
        raise Problem(
            409,
            f"The delivery is {delivery.get_state_display().lower()}: only a failed or pending one can be discarded.",
        )
    AuditEntry.record(
        actor=client.actor,
        action=AuditAction.DISCARD,
        obj=delivery,
        object_repr=f"to {delivery.destination.name}",
        detail=f"reason: {reason}",
        request=request,
    )
    return {"detail": "Discarded.", "ids": [delivery.pk]}


@router.get("/retrieves", response=list[schemas.RetrieveRow], summary="List study retrieves from poll sources")
def retrieve_list(request: HttpRequest, state: str = StudyRetrieve.State.FAILED, source: int | None = None):
    require(request, *RETRIEVE_VIEW)
    if state not in StudyRetrieve.State.values:
        raise Problem(
            422, "Unknown retrieve state.", errors=[("state", f"One of {', '.join(StudyRetrieve.State.values)}.")]
        )
    rows = StudyRetrieve.objects.filter(state=state).select_related("source")
    if source is not None:
        rows = rows.filter(source_id=source)
    return [
        {
            "id": r.pk,
            "source": r.source.name,
            "study_instance_uid": r.study_instance_uid,
            "state": r.state,
            "attempts": r.attempts,
            "last_status": r.last_status,
            "last_error": r.last_error,
            "found_at": r.found_at,
            "finished_at": r.finished_at,
        }
        for r in rows.order_by("found_at", "pk")[:MAX_ROWS]
    ]


@router.post(
    "/retrieves/{int:retrieve_id}/retry", response={202: schemas.ActionOutcome}, summary="Retry a failed retrieve"
)
def retrieve_retry_one(request: HttpRequest, retrieve_id: int):
    """Put a failed retrieve back in its source's queue with a fresh attempt budget and wake a
    worker for it (the failure queue's Retry: the same service, the same audit row)."""
    client = require(request, *RETRIEVE_RETRY)
    record = get_object_or_404(StudyRetrieve.objects.select_related("source"), pk=retrieve_id)
    queued = retrieve_retry(retrieves=StudyRetrieve.objects.filter(pk=record.pk), actor=client.actor, request=request)
    if not queued:
        raise Problem(409, f"The retrieve is {record.get_state_display().lower()}, not failed: nothing to retry.")
    return 202, {"detail": "The retrieve is queued again.", "queued": 1, "ids": [record.pk]}


@router.post(
    "/retrieves/{int:retrieve_id}/discard", response=schemas.ActionOutcome, summary="Discard a failed retrieve"
)
def retrieve_discard_one(request: HttpRequest, retrieve_id: int, body: schemas.DiscardIn):
    """Give up on a failed retrieve; the reason is required and audited."""
    client = require(request, *RETRIEVE_DISCARD)
    record = get_object_or_404(StudyRetrieve.objects.select_related("source"), pk=retrieve_id)
    form = DiscardForm({"reason": body.reason})
    form.fields["reason"].error_messages["required"] = "A reason is required to discard a retrieve."
    if not form.is_valid():
        raise Problem(422, "A reason is required to discard a retrieve.", errors=form_problems(form))
    if not retrieve_discard(retrieve=record, actor=client.actor, reason=form.cleaned_data["reason"], request=request):
        raise Problem(409, f"The retrieve is {record.get_state_display().lower()}, not failed: nothing to discard.")
    return {"detail": "Discarded.", "ids": [record.pk]}


@router.get("/poll-sources/failing", response=list[schemas.FailingSource], summary="List failing poll sources")
def poll_sources_failing(request: HttpRequest):
    """Enabled poll sources whose polls keep failing (the failure queue's section), with their
    last poll. A failed poll is retried by itself, with backoff."""
    require(request, *RETRIEVE_VIEW)
    answers = []
    for source in sources_failing():
        poll = source.polls.first()
        answers.append(
            {
                "id": source.pk,
                "name": source.name,
                "kind": source.kind,
                "consecutive_failures": source.consecutive_failures,
                "next_poll_at": source.next_poll_at,
                "last_poll_status": poll.status if poll else None,
                "last_poll_started_at": poll.started_at if poll else None,
                "last_poll_error": poll.error if poll else "",
            }
        )
    return answers


@router.post(
    "/poll-sources/{int:source_id}/poll-now", response={202: schemas.ActionOutcome}, summary="Poll a source now"
)
def poll_source_poll_now(request: HttpRequest, source_id: int):
    """Skip the source's backoff once: the next poll sweep (within a minute) polls it. 409 when
    the source is disabled. Audited as the failure queue's Poll now."""
    client = require(request, *SOURCE_POLL_NOW)
    source = get_object_or_404(PollSource, pk=source_id)
    if not source_poll_now(source=source, actor=client.actor, request=request):
        raise Problem(409, f"{source.name} is disabled.")
    return 202, {"detail": f"{source.name} will be polled within a minute.", "queued": 1, "ids": [source.pk]}


@router.post("/poll-sources/{int:source_id}/stop", response=schemas.ActionOutcome, summary="Stop polling a source")
def poll_source_stop(request: HttpRequest, source_id: int, body: schemas.DiscardIn):
    """Give up on a failing source: disable it; the reason is required and audited. Enable it
    again by configuration (`PATCH /config/poll-sources/{id}` with `enabled: true`). 409 when it
    was already off."""
    client = require(request, *SOURCE_STOP)
    source = get_object_or_404(PollSource, pk=source_id)
    form = DiscardForm({"reason": body.reason})
    form.fields["reason"].error_messages["required"] = "A reason is required to stop polling a source."
    if not form.is_valid():
        raise Problem(422, "A reason is required to stop polling a source.", errors=form_problems(form))
    if not source_stop(source=source, actor=client.actor, reason=form.cleaned_data["reason"], request=request):
        raise Problem(409, f"{source.name} was already off.")
    return {"detail": f"{source.name} is no longer polled.", "ids": [source.pk]}


def _retry(request: HttpRequest, ids: list[int], actor: str, scope: str) -> int:
    count = delivery_retry(deliveries=Delivery.objects.filter(pk__in=ids), actor=actor) if ids else 0
    for delivery in Delivery.objects.filter(pk__in=ids).select_related("destination"):
        AuditEntry.record(
            actor=actor,
            action=AuditAction.RETRY,
            obj=delivery,
            object_repr=f"to {delivery.destination.name}",
            detail=f"retry {scope}",
            request=request,
        )
    return count


def _row(d: Delivery) -> dict:
    return {
        "id": d.pk,
        "study_id": d.study_id,
        "result_id": d.result_id,
        "destination_id": d.destination_id,
        "destination": d.destination.name,
        "kind": d.kind,
        "idempotency_key": d.idempotency_key,
        "state": d.state,
        "attempts": d.attempts,
        "last_error": d.last_error,
        "last_error_class": d.last_error_class,
        "created_at": d.created_at,
        "delivered_at": d.delivered_at,
        "discarded_by": d.discarded_by,
        "discard_reason": d.discard_reason,
    }
