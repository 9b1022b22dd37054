"""Failed pulls in the failure queue: retrieves that failed for good (retry, discard with a
reason) and poll sources whose polls keep failing (poll now; stop polling, with a reason).

A self-contained section: the failure queue page includes `failures/retrieves.html` with
`retrieve_queue_context`, and every action here answers with that section alone (htmx) or
redirects back to the page. The work is done by routing/pull/failed.py, which audits.
"""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from pacslens.staff.forms import DiscardForm
from pacslens.staff.views.access import actor, staff_view
from routing.models import PollSource, StudyRetrieve
from routing.pull.failed import (
    retrieve_discard,
    retrieve_retry,
    retrieves_failed,
    source_poll_now,
    source_stop,
    sources_failing,
)

MAX_ROWS = 200


def retrieve_queue_context(request) -> dict:
    """What `failures/retrieves.html` shows (empty when the user may not see retrieves)."""
    if not request.user.has_perm("routing.view_studyretrieve"):
        return {}
    return {
        "failed_retrieves": list(retrieves_failed()[:MAX_ROWS]),
        "failing_sources": [(source, source.polls.first()) for source in sources_failing()],
    }


@staff_view("routing.view_studyretrieve")
def failure_retrieves(request) -> HttpResponse:
    return _section(request)


@staff_view("routing.view_studyretrieve", "routing.retry_studyretrieve")
@require_POST
def failure_retrieve_retry(request) -> HttpResponse:
    """POST `retrieve` (one) or `selected` (several)."""
    wanted = [request.POST["retrieve"]] if request.POST.get("retrieve") else request.POST.getlist("selected")
    ids = [int(v) for v in wanted if v.isdigit()]
    count = retrieve_retry(retrieves=StudyRetrieve.objects.filter(pk__in=ids), actor=actor(request), request=request)
    return _done(request, f"{count} retrieve{'' if count == 1 else 's'} queued again.")


@staff_view("routing.view_studyretrieve", "routing.discard_studyretrieve")
def failure_retrieve_discard(request, pk: int) -> HttpResponse:
    record = get_object_or_404(StudyRetrieve.objects.select_related("source"), pk=pk)
    form = DiscardForm(request.POST or None)
    form.fields["reason"].error_messages["required"] = "A reason is required to discard a retrieve."
    form.fields["reason"].widget.attrs["placeholder"] = "Why this study will not be fetched"
    if request.method == "POST" and form.is_valid():
        discarded = retrieve_discard(
            retrieve=record, actor=actor(request), reason=form.cleaned_data["reason"], request=request
        )
        return _done(request, "Retrieve discarded." if discarded else "That retrieve is no longer failed.")
    context = {"record": record, "form": form, "nav": "failures"}
    template = "failures/retrieve_discard.html"
    return render(request, f"{template}#form" if request.htmx else template, context)


@staff_view("routing.view_studyretrieve", "routing.retry_studyretrieve")
@require_POST
def failure_source_poll_now(request, pk: int) -> HttpResponse:
    source = get_object_or_404(PollSource, pk=pk)
    polled = source_poll_now(source=source, actor=actor(request), request=request)
    return _done(request, f"{source.name} will be polled within a minute." if polled else f"{source.name} is disabled.")


@staff_view("routing.change_pollsource")
def failure_source_stop(request, pk: int) -> HttpResponse:
    """Give up on a failing poll source: disable it, with a reason (PACS administrators' permission)."""
    source = get_object_or_404(PollSource, pk=pk)
    form = DiscardForm(request.POST or None)
    form.fields["reason"].error_messages["required"] = "A reason is required to stop polling a source."
    form.fields["reason"].widget.attrs["placeholder"] = "Why this PACS is no longer polled"
    if request.method == "POST" and form.is_valid():
        stopped = source_stop(source=source, actor=actor(request), reason=form.cleaned_data["reason"], request=request)
        return _done(request, f"{source.name} is no longer polled." if stopped else f"{source.name} was already off.")
    context = {"source": source, "form": form, "nav": "failures"}
    template = "failures/source_stop.html"
    return render(request, f"{template}#form" if request.htmx else template, context)


def _done(request, message: str) -> HttpResponse:
    if request.htmx:
        response = _section(request, notice=message)
        response["HX-Retarget"], response["HX-Reswap"] = "#failed-pulls", "outerHTML"
        return response
    messages.success(request, message)
    return redirect(reverse("failure_queue") + "#failed-pulls")


def _section(request, notice: str = "") -> HttpResponse:
    context = {**retrieve_queue_context(request), "notice": notice}
    return render(request, "failures/retrieves.html#pulls", context)
