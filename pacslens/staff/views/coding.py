"""A destination's coding profile: what its receiver needs the identifiers and codes to be."""

from __future__ import annotations

from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse

from pacslens.staff.coding_form import CodingProfileForm
from pacslens.staff.views.access import staff_view
from pacslens.staff.views.config import config_edit
from results.models import CodingProfile, Destination


@staff_view("results.view_destination", "results.change_destination")
def destination_coding(request, pk: int) -> HttpResponse:
    destination = get_object_or_404(Destination, pk=pk)
    # A destination without a profile sends the defaults: the form starts from them, and saving
    # is audited as a change from the defaults.
    profile = CodingProfile.objects.filter(destination=destination).first() or CodingProfile(destination=destination)
    return config_edit(
        request,
        form_class=CodingProfileForm,
        instance=profile,
        title="Coding profile",
        success_url=reverse("endpoint_list"),
        form_kwargs={"destination": destination},
    )
