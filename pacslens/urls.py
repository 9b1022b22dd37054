from django.contrib import admin
from django.urls import include, path

from pacslens import views

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("admin/", admin.site.urls),
    path("dicomweb/", include("routing.urls")),
]
