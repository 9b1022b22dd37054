"""The DICOM listener imports only what receiving needs (docs/operations.md, "Listener memory").

Every module a listener process holds costs memory in each of its processes. The real
`manage.py dicom_listener` runs with two processes and serves a C-ECHO and a C-STORE; then every
process of its tree writes its `sys.modules` to a file on SIGUSR1 (a handler set before Django
starts, which the forked processes inherit). No sizes are asserted: memory figures vary with the
machine; the modules a process holds do not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]  # pynetdicom creates its SOP classes at run time

from tests.support.ct import ct_series_write
from tests.support.listener_proc import DEFAULT_CALLING_AE_TITLES, PYTHON, REPO, ListenerProcess

# manage.py, plus the handler that dumps sys.modules.
_MANAGE_WITH_MODULE_DUMP = """
import os, runpy, signal, sys
def dump(signum, frame):
    path = os.path.join(os.environ["MODULE_DUMP_DIR"], str(os.getpid()))
    with open(path + ".part", "w") as file:
        file.write("\\n".join(sorted(sys.modules)))
    os.replace(path + ".part", path)
signal.signal(signal.SIGUSR1, dump)
sys.argv = ["manage.py", *sys.argv[1:]]
runpy.run_path("manage.py", run_name="__main__")
"""

# What only the web process or the workers use; each cost every listener process 2 to 18 MiB.
NOT_IN_THE_LISTENER = (
    "ninja",  # the automation API (pacslens/api), and pydantic with it
    "pydantic",
    "onnxruntime",  # inference
    "highdicom",  # the SR, summary image and KOS
    "fhir",  # fhir.resources: FHIR deliveries
    "hl7apy",  # HL7 deliveries
    "authlib",  # OAuth for HTTPS destinations and poll sources
    "dicomweb_client",  # STOW-RS deliveries, DICOMweb polls
    "cryptography",  # sealed destination secrets (routing/models/sealed.py)
    "pacslens.urls",  # the URLconf: the staff UI, the API, and all the above
    "pacslens.staff",
    "pacslens.api.main",
    "results.deliver",
    "results.inference",
)
# What a listener child must hold: the dump is real, and it was taken after serving.
RECEIVING = ("pynetdicom", "routing.receive.listener", "routing.store.spool", "routing.store.header")


@pytest.fixture
def listener_modules(listener_factory, tmp_path: Path) -> dict[str, set[str]]:
    """`manage.py dicom_listener --processes 2` after a C-STORE: the modules of each process."""
    listener: ListenerProcess = listener_factory(processes=2, run=False)
    dump_dir = tmp_path / "modules"
    dump_dir.mkdir()
    listener.env["MODULE_DUMP_DIR"] = str(dump_dir)
    listener.log_path = listener.data_dir / "listener.log"
    with open(listener.log_path, "ab") as log:
        listener.process = subprocess.Popen(
            [PYTHON, "-c", _MANAGE_WITH_MODULE_DUMP, "dicom_listener"]
            + ["--port", str(listener.port), "--processes", "2"],
            cwd=REPO,
            env=listener.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    listener.wait_ready()
    store(listener, ct_series_write(tmp_path / "ct", 3, rows=32, columns=32))

    supervisor = listener.process.pid
    pids = listener.pids()
    assert len(pids) == 3, f"a supervisor and two children: {pids}"
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all((dump_dir / str(pid)).exists() for pid in pids):
        time.sleep(0.05)
    missing = [pid for pid in pids if not (dump_dir / str(pid)).exists()]
    assert not missing, f"no module list from {missing}:\n{listener.log()}"
    return {
        "supervisor" if pid == supervisor else f"child {pid}": set((dump_dir / str(pid)).read_text().split())
        for pid in pids
    }


def store(listener: ListenerProcess, paths: list[Path]) -> None:
    ae = AE(ae_title=DEFAULT_CALLING_AE_TITLES[-1])
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(listener.host, listener.port, ae_title=listener.ae_title)
    assert assoc.is_established
    try:
        for path in paths:
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
    finally:
        assoc.release()
    deadline = time.monotonic() + 20
    while listener.instance_count() < len(paths) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listener.instance_count() == len(paths)


class TestListenerImports:
    def test_no_process_imports_what_only_the_web_or_the_workers_use(self, listener_modules):
        for process, modules in listener_modules.items():
            if process != "supervisor":
                assert set(RECEIVING) <= modules, (process, sorted(set(RECEIVING) - modules))
            heavy = [n for n in NOT_IN_THE_LISTENER if any(m == n or m.startswith(f"{n}.") for m in modules)]
            assert not heavy, (
                f"the listener's {process} imports {heavy}: keep them out of the models, the apps' "
                "import graph and the listener's checks (docs/operations.md, 'Listener memory')"
            )

    def test_the_children_import_nothing_the_supervisor_did_not(self, listener_modules):
        """A module first imported after the fork is private to each child; before it, it is shared."""
        supervisor = listener_modules["supervisor"]
        for process, modules in listener_modules.items():
            assert modules <= supervisor, (
                f"the listener's {process} imported {sorted(modules - supervisor)[:10]} after the fork: import "
                "them at module level in what the listener command imports, so its processes share them"
            )
