"""`manage.py export_openapi_schema --api pacslens.api.main.api --indent 2 --output docs/api/openapi.json`.

django-ninja's own command, which Django would find by itself if "ninja" were an installed app;
it is not (settings.INSTALLED_APPS says why), so this app offers it.
"""

from __future__ import annotations

from ninja.management.commands.export_openapi_schema import Command

__all__ = ["Command"]
