"""The receive speed-ups patch pynetdicom's internals: they must apply only where they were written for."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from routing.receive.pynetdicom_speedups import PATCHED_PYNETDICOM
from tests.support.listener_proc import REPO

# Another pynetdicom, where an internal the patches use was renamed: the import must still work
# and the listener run stock pynetdicom.
_RENAMED_INTERNAL = """
import pynetdicom, pynetdicom.pdu
pynetdicom.__version__ = {version!r}
del pynetdicom.pdu.A_ABORT_RQ
from routing.receive.pynetdicom_speedups import pynetdicom_speedups, pynetdicom_speedups_active
print(pynetdicom_speedups(1024 * 1024), pynetdicom_speedups_active())
"""


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


class TestVersionGuard:
    def test_pinned_pynetdicom_is_the_patched_one(self):
        pins = re.findall(r"^pynetdicom==(\S+)", (REPO / "requirements.txt").read_text(), re.MULTILINE)
        assert pins == [PATCHED_PYNETDICOM], "re-check routing/receive/pynetdicom_speedups.py against the new pin"

    def test_another_version_with_a_renamed_internal_runs_stock(self):
        assert run_python(_RENAMED_INTERNAL.format(version="9.9.9")) == "False False"

    def test_a_missing_internal_under_the_same_version_runs_stock(self):
        assert run_python(_RENAMED_INTERNAL.format(version=PATCHED_PYNETDICOM)) == "False False"


def test_speedups_are_on_in_the_deployed_listener(listener_factory):
    listener = listener_factory()
    assert "pynetdicom 3.0.4 receive speed-ups on" in listener.log()
    deadline = time.monotonic() + 30
    detail = None
    while time.monotonic() < deadline and detail is None:
        rows = listener.query("SELECT detail FROM routing_heartbeat WHERE role = 'listener'")
        detail = rows[0]["detail"] if rows else None
        time.sleep(0.2)
    assert detail is not None and '"pynetdicom_speedups": true' in detail
