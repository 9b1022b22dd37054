"""Staff UI URLs of the results app (included at the site root by pacslens/urls.py)."""

from __future__ import annotations

from django.urls import path

from results.views import destinations, failures, models_page, study_actions, triage

urlpatterns = [
    path("failures/", failures.failure_queue, name="failure_queue"),
    path("failures/retry/", failures.failure_retry, name="failure_retry"),
    path("failures/<int:pk>/discard/", failures.failure_discard, name="failure_discard"),
    path("studies/<int:pk>/rerun/", study_actions.study_rerun_view, name="study_rerun"),
    path("studies/<int:pk>/redeliver/", study_actions.study_redeliver, name="study_redeliver"),
    path("endpoints/destinations/new/", destinations.destination_edit, name="destination_create"),
    path("endpoints/destinations/<int:pk>/", destinations.destination_edit, name="destination_edit"),
    path("endpoints/destinations/<int:pk>/toggle/", destinations.destination_toggle, name="destination_toggle"),
    path("endpoints/destinations/<int:pk>/test/", destinations.destination_test, name="destination_test"),
    path("models/", models_page.model_list, name="model_list"),
    path("audit/triage/", triage.triage_audit, name="triage_audit"),
    path("audit/triage.csv", triage.triage_audit_csv, name="triage_audit_csv"),
]
