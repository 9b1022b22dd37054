from django.contrib import admin
from django.urls import include, path

from pacslens import views

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("metrics", views.metrics, name="metrics"),
    path("conformance", views.conformance, name="conformance"),
    path("admin/", admin.site.urls),
    path("dicomweb/", include("routing.urls")),
    # The staff UI (docs/ui.md): routing pages (dashboard, studies, endpoints, rules, audit log)
    # and results pages (failure queue, destinations, models, triage audit).
    path("", include("routing.views.urls")),
    path("", include("results.views.urls")),
]
