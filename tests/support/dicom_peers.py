"""A DICOM peer that answers what the test tells it: a pynetdicom storage SCP on a free port.

`StubSCP(status=..., require_calling_aet=..., reply_delay=..., drop_after_store=...)` plays a
PACS that accepts, refuses, stalls or hangs up; the `scp_factory` fixture (registered in
conftest) starts as many as a test needs and shuts them all down at teardown.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.uid import Comprehensive3DSRStorage
from pynetdicom import AE, evt

from tests.support.net import free_port

SCP_AE = "TESTSCP"


class StubSCP:
    """A pynetdicom storage SCP on a free port answering C-STOREs with `status`."""

    def __init__(
        self,
        *,
        status: int = 0x0000,
        require_calling_aet: list[str] | None = None,
        require_called_aet: bool = False,
        sop_classes: tuple[str, ...] = (Comprehensive3DSRStorage,),
        max_associations: int = 10,
        reply_delay: threading.Event | None = None,
        drop_after_store: bool = False,
    ) -> None:
        self.status = status
        self.drop_after_store = drop_after_store
        self.received: list[str] = []
        self.port = free_port()
        self._hold = reply_delay
        ae = AE(ae_title=SCP_AE)
        ae.require_calling_aet = require_calling_aet or []
        ae.require_called_aet = require_called_aet
        ae.maximum_associations = max_associations
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: Any) -> int:
        if self._hold is not None:
            # Never answers within the SCU's DIMSE timeout: the test releases it at teardown.
            self._hold.wait(30)
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        if self.drop_after_store:
            # Like a PACS that restarts or closes idle associations between two results.
            threading.Timer(0.1, event.assoc.abort).start()
        return self.status

    def shutdown(self) -> None:
        if self._hold is not None:
            self._hold.set()
        self.server.shutdown()


@pytest.fixture
def scp_factory() -> Iterator[Any]:
    started: list[StubSCP] = []

    def start(**kwargs: Any) -> StubSCP:
        scp = StubSCP(**kwargs)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.shutdown()
