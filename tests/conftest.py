"""Shared test fixtures.

The peers, generators and factories live in tests/support/; the fixtures of several test
files are registered here from their support modules. Interop tests talk to real programs
(dcmtk, Orthanc, a Node FHIR server): a missing one skips on a developer machine and fails under CI=true
(tests/support/net.py).
"""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.support.alert_receivers",
    "tests.support.browser",
    "tests.support.dicom_peers",
    "tests.support.factories",
    "tests.support.fhir_router",
    "tests.support.fhir_server",
    "tests.support.listener_proc",
    "tests.support.listener_thread",
    "tests.support.mllp",
    "tests.support.oauth_server",
    "tests.support.orthanc",
    "tests.support.postgres",
    "tests.support.pull",
    "tests.support.web",
    "tests.support.api",
]


@pytest.fixture
def data_dir(settings, tmp_path):
    """A private PACSLENS_DATA_DIR for the test."""
    path = tmp_path / "data"
    path.mkdir()
    settings.DATA_DIR = path
    return path
