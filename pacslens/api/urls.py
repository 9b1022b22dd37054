"""The API clients page (staff UI) and the API itself, included at the site root."""

from __future__ import annotations

from django.urls import path

from pacslens.api import views
from pacslens.api.main import api

urlpatterns = [
    path("api/v1/", api.urls),
    path("api-clients/", views.api_clients, name="api_clients"),
    path("api-clients/<int:pk>/tokens/", views.api_client_token_issue, name="api_client_token_issue"),
    path("api-clients/<int:pk>/revoke/", views.api_client_revoke_view, name="api_client_revoke"),
    path("api-clients/tokens/<int:pk>/revoke/", views.api_token_revoke_view, name="api_token_revoke"),
]
