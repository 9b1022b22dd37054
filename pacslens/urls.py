from django.contrib import admin
from django.urls import include, path

from pacslens.ops import views

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("metrics", views.metrics, name="metrics"),
    path("conformance", views.conformance, name="conformance"),
    path("admin/", admin.site.urls),
    path("dicomweb/", include("routing.receive.urls")),
    # The automation API (docs/api.md): /api/v1/ (bearer tokens only) and its clients page.
    path("", include("pacslens.api.urls")),
    # The staff UI (docs/ui.md): dashboard, studies, failure queue, endpoints, rules, models,
    # triage audit, audit log.
    path("", include("pacslens.staff.urls")),
]

# A host name outside PACSLENS_ALLOWED_HOSTS gets a page saying so (pacslens/ops/views.py).
handler400 = "pacslens.ops.views.bad_request"
