from __future__ import annotations

from django.apps import AppConfig


class ApiConfig(AppConfig):
    name = "pacslens.api"
    label = "api"
    verbose_name = "Automation API"
    default_auto_field = "django.db.models.BigAutoField"
