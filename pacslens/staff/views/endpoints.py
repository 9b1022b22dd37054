"""AE titles and endpoints: one page listing DICOM nodes, result destinations, poll sources and
STOW-RS senders; create / edit / enable-disable each; a Test button whose result shows inline."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from pacslens.ops import endpoint_tests
from pacslens.ops.probes import ProbeResult
from pacslens.staff.forms import ApplicationEntityForm, PollSourceForm
from pacslens.staff.views.access import actor, render_page, staff_view
from pacslens.staff.views.config import config_delete, config_edit, config_toggle
from results.models import Destination
from routing.models import (
    ApplicationEntity,
    PollSource,
    StowSender,
)


@staff_view()  # either of two view permissions: checked below
def endpoint_list(request) -> HttpResponse:
    user = request.user
    if not (user.has_perm("routing.view_applicationentity") or user.has_perm("results.view_destination")):
        raise PermissionDenied("Your role does not allow this.")
    context = {
        "nav": "endpoints",
        "entities": ApplicationEntity.objects.all() if user.has_perm("routing.view_applicationentity") else None,
        "destinations": Destination.objects.select_related("application_entity")
        if user.has_perm("results.view_destination")
        else None,
        "poll_sources": PollSource.objects.select_related("pacs") if user.has_perm("routing.view_pollsource") else None,
        "stow_senders": StowSender.objects.all() if user.has_perm("routing.view_stowsender") else None,
    }
    return render_page(request, "endpoints/list.html", context, fragment="tables")


@staff_view("routing.view_applicationentity", "routing.change_applicationentity", "routing.add_applicationentity")
def ae_edit(request, pk: int | None = None) -> HttpResponse:
    instance = get_object_or_404(ApplicationEntity, pk=pk) if pk else None
    return config_edit(
        request,
        form_class=ApplicationEntityForm,
        instance=instance,
        title="AE title",
        success_url=reverse("endpoint_list"),
    )


@staff_view("routing.change_applicationentity")
@require_POST
def ae_toggle(request, pk: int) -> HttpResponse:
    config_toggle(request, obj=get_object_or_404(ApplicationEntity, pk=pk))
    return endpoint_list(request)


@staff_view("routing.delete_applicationentity")
def ae_delete(request, pk: int) -> HttpResponse:
    entity = get_object_or_404(ApplicationEntity, pk=pk)
    return config_delete(request, obj=entity, title="AE title", success_url=reverse("endpoint_list"), nav="endpoints")


@staff_view("routing.change_applicationentity")
@require_POST
def ae_test(request, pk: int) -> HttpResponse:
    """C-ECHO the node from our AE title; the answer replaces the row's result cell."""
    entity = get_object_or_404(ApplicationEntity, pk=pk)
    result, problem = endpoint_tests.ae_test(entity, actor=actor(request), request=request)
    return render_probe(request, obj=entity, result=result, problem=problem, what="C-ECHO")


@staff_view("routing.change_applicationentity")
def ae_assess(request, pk: int) -> HttpResponse:
    """The integration assessment of `manage.py assess` on its own page (the report is wide and
    long): GET offers the button, POST runs it; nothing is stored in the node."""
    entity = get_object_or_404(ApplicationEntity, pk=pk)
    context = {"nav": "endpoints", "entity": entity, "report": None}
    if request.method == "POST":
        report = endpoint_tests.ae_assess(entity, actor=actor(request), request=request)
        context["report"] = report.as_text() if report else None
    return render_page(request, "endpoints/assessment.html", context, fragment="report")


@staff_view("routing.view_pollsource", "routing.change_pollsource", "routing.add_pollsource")
def poll_source_edit(request, pk: int | None = None) -> HttpResponse:
    instance = get_object_or_404(PollSource, pk=pk) if pk else None
    return config_edit(
        request, form_class=PollSourceForm, instance=instance, title="Poll source", success_url=reverse("endpoint_list")
    )


@staff_view("routing.change_pollsource")
@require_POST
def poll_source_toggle(request, pk: int) -> HttpResponse:
    config_toggle(request, obj=get_object_or_404(PollSource, pk=pk))
    return endpoint_list(request)


@staff_view("routing.change_pollsource")
@require_POST
def poll_source_test(request, pk: int) -> HttpResponse:
    """C-ECHO the PACS of a DIMSE source, or a QIDO-RS request to a DICOMweb one."""
    source = get_object_or_404(PollSource.objects.select_related("pacs"), pk=pk)
    result, problem = endpoint_tests.poll_source_test(source, actor=actor(request), request=request)
    return render_probe(request, obj=source, result=result, problem=problem, what="Test")


def render_probe(request, *, obj, result: ProbeResult | None, problem: str, what: str) -> HttpResponse:
    """A Test button's answer: the result cell for htmx, a whole page without JavaScript."""
    context = {"result": result, "problem": problem, "what": what, "tested": obj, "nav": "endpoints"}
    template = "endpoints/probe.html" if request.htmx else "endpoints/probe_page.html"
    return render(request, template, context)
