"""AE titles and endpoints: one page listing DICOM nodes, result destinations, poll sources and
STOW-RS senders; create / edit / enable-disable each; a Test button whose result shows inline."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from pacslens.ops.assess import node_assess
from pacslens.ops.probes import ProbeResult, probe_dicom_echo, probe_http
from pacslens.staff.forms import ApplicationEntityForm, PollSourceForm
from pacslens.staff.views.access import actor, render_page, staff_view
from pacslens.staff.views.config import config_delete, config_edit, config_toggle
from results.models import Destination
from routing.models import (
    ApplicationEntity,
    AuditAction,
    AuditEntry,
    PollSource,
    StowSender,
)
from routing.pull.dicomweb import dicomweb_session
from routing.pull.types import PullError


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
    if entity.missing_address or entity.port is None:
        result = None
        problem = f"This AE title has no {entity.missing_address}: edit it to add one, then test again."
    else:
        result = probe_dicom_echo(host=entity.host, port=entity.port, called_ae_title=entity.ae_title, tls=entity.tls)
        problem = ""
    AuditEntry.record(
        actor=actor(request),
        action=AuditAction.TEST,
        obj=entity,
        object_repr=str(entity),
        detail=result.audit_text() if result else problem,
        request=request,
    )
    return render_probe(request, obj=entity, result=result, problem=problem, what="C-ECHO")


# Per probe: an assessment runs about ten probes in the request, so keep each short enough that
# a node that drops packets still answers within the web server's timeout.
ASSESS_PROBE_TIMEOUT = 2.0


@staff_view("routing.change_applicationentity")
def ae_assess(request, pk: int) -> HttpResponse:
    """The integration assessment of `manage.py assess` on its own page (the report is wide and
    long): GET offers the button, POST runs it; nothing is stored in the node."""
    entity = get_object_or_404(ApplicationEntity, pk=pk)
    context = {"nav": "endpoints", "entity": entity, "report": None}
    if request.method == "POST" and not entity.missing_address:
        context["report"] = node_assess(node=entity.ae_title, timeout=ASSESS_PROBE_TIMEOUT).as_text()
        AuditEntry.record(
            actor=actor(request),
            action=AuditAction.TEST,
            obj=entity,
            object_repr=str(entity),
            detail="integration assessment",
            request=request,
        )
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
    problem, result = "", None
    if source.kind == PollSource.Kind.DIMSE:
        pacs = source.pacs
        if pacs is None:
            problem = "The source has no PACS: choose its AE title."
        elif pacs.missing_address or pacs.port is None:
            problem = f"The source's PACS ({pacs.ae_title}) has no {pacs.missing_address}: edit its AE title."
        else:
            result = probe_dicom_echo(host=pacs.host, port=pacs.port, called_ae_title=pacs.ae_title, tls=pacs.tls)
    else:
        try:
            session = dicomweb_session(source)
        except PullError as exc:
            problem = f"The source's configuration is refused: {exc}."
        else:
            with session:
                result = probe_http(url=source.dicomweb_url, kind="dicomweb", session=session)
    AuditEntry.record(
        actor=actor(request),
        action=AuditAction.TEST,
        obj=source,
        object_repr=str(source),
        detail=result.audit_text() if result else problem,
        request=request,
    )
    return render_probe(request, obj=source, result=result, problem=problem, what="Test")


def render_probe(request, *, obj, result: ProbeResult | None, problem: str, what: str) -> HttpResponse:
    """A Test button's answer: the result cell for htmx, a whole page without JavaScript."""
    context = {"result": result, "problem": problem, "what": what, "tested": obj, "nav": "endpoints"}
    template = "endpoints/probe.html" if request.htmx else "endpoints/probe_page.html"
    return render(request, template, context)
