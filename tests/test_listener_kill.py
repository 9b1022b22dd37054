"""Crash and shutdown in the middle of an association, with the real listener and dcmtk `storescu`.

SIGKILL: every instance the sender saw acknowledged with Success is on disk and in the
database after a restart; nothing half-written is visible as an instance. SIGTERM: the
running association finishes, then the listener exits 0.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support.ct import ct_series_write
from tests.support.dicom_files import dataset_bytes
from tests.support.listener_proc import ListenerProcess, dcmtk_env
from tests.support.net import free_port, require_program

pytestmark = pytest.mark.interop

SERIES_SIZE = 300
SIGNAL_AFTER_ACKS = 25  # acknowledged instances before the signal
SUCCESS_LINE = "Received Store Response (Success)"


class StorescuRun:
    """`storescu -v` in the background, its log in a file we can watch while it runs."""

    def __init__(self, listener: ListenerProcess, files: list[Path], log_path: Path) -> None:
        self.log_path = log_path
        self.log_file = open(log_path, "wb")  # noqa: SIM115 - lives as long as storescu; closed in wait()
        self.process = subprocess.Popen(
            [require_program("storescu"), "-v", "-aet", "STORESCU", "-aec", listener.ae_title]
            + [listener.host, str(listener.port)]
            + [str(f) for f in files],
            env=dcmtk_env(),
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_acks(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(SUCCESS_LINE) < count:
            assert self.process.poll() is None, f"storescu ended early:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, "storescu made no progress"
            time.sleep(0.005)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self.log_file.close()

    def acknowledged_files(self) -> list[Path]:
        """Files answered with Success: each response follows the 'Sending file' line of its file."""
        acked, current = [], None
        for line in self.log().splitlines():
            if "Sending file: " in line:
                current = Path(line.split("Sending file: ", 1)[1].strip())
            elif SUCCESS_LINE in line and current is not None:
                acked.append(current)
                current = None
        return acked


def sop_instance_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def assert_store_consistent(listener: ListenerProcess, sent: dict[str, Path]) -> dict[str, dict]:
    """No row without its complete file; no file in the store that is not a complete sent instance."""
    rows = {row["sop_instance_uid"]: row for row in listener.instances()}
    recorded_paths = set()
    for uid, row in rows.items():
        path = listener.instance_path(row)
        assert path.is_file(), f"Instance row {row['id']} points to a missing file"
        assert dataset_bytes(path) == dataset_bytes(sent[uid]), f"stored {uid} differs from what was sent"
        recorded_paths.add(path)
    sent_datasets = {dataset_bytes(p) for p in sent.values()}
    for path in listener.stored_files():
        if path not in recorded_paths:
            # A crash between rename and commit leaves an unrecorded file: it must still be whole.
            assert dataset_bytes(path) in sent_datasets, f"partial file visible in the store: {path}"
    return rows


def test_kill_9_mid_association_loses_no_acknowledged_instance(listener, tmp_path):
    files = ct_series_write(tmp_path / "ct", SERIES_SIZE)
    sent = {sop_instance_uid(p): p for p in files}
    sender = StorescuRun(listener, files, tmp_path / "storescu.log")

    sender.wait_for_acks(SIGNAL_AFTER_ACKS)
    listener.kill()
    assert sender.wait() != 0, "the association should have been cut off"

    acked = sender.acknowledged_files()
    assert SIGNAL_AFTER_ACKS <= len(acked) < SERIES_SIZE
    # Restart on the same data dir, as a supervisor would.
    listener.port = free_port()
    listener.start()
    rows = assert_store_consistent(listener, sent)
    for path in acked:
        assert sop_instance_uid(path) in rows, f"{path.name} was acknowledged but is not recorded"

    # The sender retries everything: the store ends complete, each instance once.
    retry = StorescuRun(listener, files, tmp_path / "storescu-retry.log")
    assert retry.wait() == 0, retry.log()[-3000:]
    rows = assert_store_consistent(listener, sent)
    assert set(rows) == set(sent)
    assert listener.instance_count() == SERIES_SIZE


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_lets_the_running_association_finish(listener_factory, tmp_path, processes):
    listener = listener_factory(processes=processes)
    files = ct_series_write(tmp_path / "ct", SERIES_SIZE)
    sent = {sop_instance_uid(p): p for p in files}
    sender = StorescuRun(listener, files, tmp_path / "storescu.log")

    sender.wait_for_acks(SIGNAL_AFTER_ACKS)
    listener.process.terminate()

    assert sender.wait() == 0, sender.log()[-3000:]
    assert listener.process.wait(60) == 0, listener.log()
    assert len(sender.acknowledged_files()) == SERIES_SIZE
    rows = assert_store_consistent(listener, sent)
    assert set(rows) == set(sent)
    assert listener.echo() is None  # no longer accepting
