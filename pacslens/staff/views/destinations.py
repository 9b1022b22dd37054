"""Result destinations: create / edit / enable-disable, and the Test button (C-ECHO, HTTP, MLLP)."""

from __future__ import annotations

from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.views.decorators.http import require_POST

from pacslens.ops import endpoint_tests
from pacslens.staff.forms import DestinationForm
from pacslens.staff.views.access import actor, staff_view
from pacslens.staff.views.config import config_delete, config_edit, config_toggle
from pacslens.staff.views.endpoints import endpoint_list, render_probe
from results.models import Destination


@staff_view("results.view_destination", "results.change_destination", "results.add_destination")
def destination_edit(request, pk: int | None = None) -> HttpResponse:
    instance = get_object_or_404(Destination, pk=pk) if pk else None
    return config_edit(
        request,
        form_class=DestinationForm,
        instance=instance,
        title="Destination",
        success_url=reverse("endpoint_list"),
    )


@staff_view("results.change_destination")
@require_POST
def destination_toggle(request, pk: int) -> HttpResponse:
    config_toggle(request, obj=get_object_or_404(Destination, pk=pk))
    return endpoint_list(request)


@staff_view("results.delete_destination")
def destination_delete(request, pk: int) -> HttpResponse:
    destination = get_object_or_404(Destination, pk=pk)
    return config_delete(
        request, obj=destination, title="Destination", success_url=reverse("endpoint_list"), nav="endpoints"
    )


@staff_view("results.change_destination")
@require_POST
def destination_test(request, pk: int) -> HttpResponse:
    destination = get_object_or_404(Destination.objects.select_related("application_entity"), pk=pk)
    result, problem = endpoint_tests.destination_test(destination, actor=actor(request), request=request)
    what = {"dicom": "C-ECHO", "hl7": "MLLP connect"}.get(destination.kind, "HTTP probe")
    return render_probe(request, obj=destination, result=result, problem=problem, what=what)
