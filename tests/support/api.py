"""The automation API over real HTTP: the `api` fixture starts gunicorn on the test database and
gives one client (and token) per role, and a `requests` session per role to call it with.

    def test_x(api):
        response = api.call("informaticist", "GET", "/studies")
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from django.apps import apps

from pacslens.api.services import api_client_create
from tests.support.factories import staff_groups_ensure
from tests.support.web import gunicorn_run

API_ROLES = ("pacs_administrator", "informaticist", "auditor")


def api_groups_ensure() -> None:
    """The staff groups and the Auditors group, as their migrations make them (a transactional
    test's flush empties the tables)."""
    staff_groups_ensure()
    importlib.import_module("pacslens.api.migrations.0002_auditors_group").create_auditors_group(apps, None)


@dataclass
class ApiServer:
    url: str
    tokens: dict[str, str] = field(default_factory=dict)

    def call(self, role: str | None, method: str, path: str, *, headers: dict | None = None, **kwargs):
        """`role` None sends no Authorization header; any other name not in `tokens` is sent as the token."""
        headers = dict(headers or {})
        if role is not None:
            headers["Authorization"] = f"Bearer {self.tokens.get(role, role)}"
        return requests.request(method, f"{self.url}/api/v1{path}", headers=headers, timeout=30, **kwargs)


@pytest.fixture(scope="module")
def api_gunicorn(django_db_setup, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """One server per test module: each test's flush empties the tables it reads, not the server."""
    from django.conf import settings

    data_dir = tmp_path_factory.mktemp("api-data")
    with gunicorn_run(data_dir=data_dir, database=settings.DATABASES["default"]) as url:
        yield url, data_dir


@pytest.fixture
def api(api_gunicorn, transactional_db, settings) -> ApiServer:
    """The module's server; the test shares its data dir (the secrets key file is there)."""
    url, settings.DATA_DIR = api_gunicorn
    api_groups_ensure()
    server = ApiServer(url=url)
    for role in API_ROLES:
        _, server.tokens[role] = api_client_create(name=f"test-{role}", role=role, actor="pytest")
    return server
