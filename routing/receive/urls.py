"""DICOMweb endpoints served by the web process (mounted at /dicomweb/)."""

from __future__ import annotations

from django.urls import path

from routing.receive import stow

app_name = "dicomweb"

urlpatterns = [
    path("studies", stow.stow_studies, name="stow"),
    path("studies/<str:study_instance_uid>", stow.stow_studies, name="stow-study"),
]
