"""The study page's actions: re-run inference, re-deliver the current results."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST
from django_htmx.http import trigger_client_event

from pacslens.staff.views.access import actor, staff_view
from results.deliver import ledger
from routing.completion import study_request_rerun
from routing.models import AuditAction, AuditEntry, Study


@staff_view("routing.view_study", "routing.rerun_inference")
@require_POST
def study_rerun_view(request, pk: int) -> HttpResponse:
    study = get_object_or_404(Study, pk=pk)
    if study_request_rerun(study=study, actor=actor(request)):
        AuditEntry.record(actor=actor(request), action=AuditAction.RERUN, obj=study, request=request)
        text, level = "Inference will run again; the new result will supersede the current one.", messages.SUCCESS
    else:
        text, level = (
            f"The study is {study.get_state_display().lower()}: wait until the pipeline is done with it.",
            messages.WARNING,
        )
    return _answer(request, study, text, level)


@staff_view("routing.view_study", "results.retry_delivery")
@require_POST
def study_redeliver(request, pk: int) -> HttpResponse:
    """Send the study's current results again, to every destination, with the same idempotency keys.
    A study already delivered somewhere is re-sent only once staff confirm (`confirm=yes`)."""
    study = get_object_or_404(Study, pk=pk)
    delivered_to = ledger.study_delivered_destinations(study=study)
    if delivered_to and request.POST.get("confirm") != "yes":
        context = {"study": study, "delivered_to": delivered_to, "nav": "studies"}
        template = "studies/redeliver_confirm.html"
        return render(request, f"{template}#prompt" if request.htmx else template, context)
    count, ids = ledger.study_redeliver(study=study, actor=actor(request))
    AuditEntry.record(
        actor=actor(request),
        action=AuditAction.RETRY,
        obj=study,
        detail=f"re-deliver study: {count} of {len(ids)} deliveries queued",
        request=request,
    )
    if count:
        return _answer(request, study, f"{count} deliver{'y' if count == 1 else 'ies'} queued again.", messages.SUCCESS)
    return _answer(
        request, study, "Nothing to re-deliver: no delivered or failed delivery of a current result.", messages.WARNING
    )


def _answer(request, study: Study, text: str, level: int) -> HttpResponse:
    if request.htmx:
        # The message goes next to the buttons; the live panel listens for the event and re-renders itself.
        css = "success" if level == messages.SUCCESS else "warning"
        response = render(request, "studies/action_message.html", {"text": text, "css": css})
        return trigger_client_event(response, "study-changed")
    messages.add_message(request, level, text)
    return redirect("study_detail", pk=study.pk)
