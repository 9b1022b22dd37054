"""The DICOM listener in the test's own process (fixture registered in conftest): real sockets,
the test's database and settings, stopped at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from routing.models import ApplicationEntity
from routing.receive.listener import DicomListener


@pytest.fixture
def thread_listener_factory(transactional_db, data_dir, settings) -> Iterator[Callable[..., DicomListener]]:
    """start(calling=AE, ae_title="PACSLENS", settings_overrides={...}, **DicomListener kwargs):
    a started listener on a free port that accepts `calling` from 127.0.0.1. `settings_overrides`
    are applied first (the listener reads its settings at start)."""
    started: list[DicomListener] = []

    def start(
        *, calling: str, ae_title: str = "PACSLENS", settings_overrides: dict[str, Any] | None = None, **kwargs: Any
    ) -> DicomListener:
        ApplicationEntity.objects.get_or_create(ae_title=calling, defaults={"host": "127.0.0.1", "may_send": True})
        for name, value in (settings_overrides or {}).items():
            setattr(settings, name, value)
        dicom = DicomListener(host="127.0.0.1", port=0, ae_title=ae_title, **kwargs)
        dicom.start()
        started.append(dicom)
        return dicom

    yield start
    for dicom in started:
        dicom.stop(grace=2)
