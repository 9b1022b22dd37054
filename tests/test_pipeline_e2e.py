"""End to end over real processes: dcmtk storescu → listener → completion → routing → inference.

The listener and the worker cluster run as subprocesses on their own data dir, exactly as
`make run` starts them; the test only sends studies and reads the database.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from pacslens.demo_study import demo_study_write
from tests.support.listener_proc import PYTHON, REPO, base_env

pytestmark = pytest.mark.interop

FINAL_STATES = {"inferred", "ignored", "failed"}
# Routes any head study (MR too) to the CT-only demo model, after the demo rule: exercises
# "not applicable". Imported through import_config, as a site would.
EXTRA_RULES = """\
pacslens_config: 1
routing_rules:
- name: 'Demo: CT head to the demonstration model'
  position: 1000
  models: [{name: demo-hyperdense-head-ct, version: '2.0'}]
  conditions:
  - {attribute: Modality, operator: equals, value: CT}
  - {attribute: BodyPartExamined, operator: one_of, value: [HEAD, BRAIN]}
- name: Any head
  position: 2000
  models: [{name: demo-hyperdense-head-ct, version: '2.0'}]
  conditions:
  - {attribute: BodyPartExamined, operator: equals, value: HEAD}
"""


@pytest.fixture
def site(listener_factory, tmp_path):
    """A listener plus a worker cluster sharing one data dir, set up like `make run` does."""
    listener = listener_factory(env={"PACSLENS_STUDY_RELEASE_GRACE": "0.5", "PACSLENS_STUDY_QUIET_PERIOD": "30"})
    env = dict(listener.env)
    manage = [PYTHON, "manage.py"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(EXTRA_RULES)
    for command in (["setup_site"], ["import_config", str(rules)]):
        done = subprocess.run(manage + command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    log = open(listener.data_dir / "workers.log", "ab")  # noqa: SIM115 - handed to the child, closed below
    workers = subprocess.Popen(
        manage + ["run_workers"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    yield listener
    workers.terminate()
    try:
        workers.wait(60)
    except subprocess.TimeoutExpired:
        workers.kill()
        workers.wait(10)


def send(listener, paths: list[Path], calling: str = "STORESCU") -> None:
    done = listener.storescu(paths, calling_ae_title=calling)
    assert done.returncode == 0, done.stderr


def wait_final(listener, study_uids: list[str], timeout: float = 120.0, count: int = 1) -> dict[str, dict]:
    """Each study's row once it reached a final state with at least `count` results (or settled without)."""
    deadline = time.monotonic() + timeout
    rows: dict[str, dict] = {}
    while time.monotonic() < deadline:
        rows = {r["study_instance_uid"]: r for r in listener.studies() if r["study_instance_uid"] in study_uids}
        if len(rows) == len(study_uids) and all(r["state"] in FINAL_STATES for r in rows.values()):
            results = {r["study_id"] for r in listener.query("SELECT study_id FROM results_inferenceresult")}
            inferred = all(r["state"] == "ignored" or r["id"] in results for r in rows.values())
            if inferred and (count == 1 or all(len(results_of(listener, r["id"])) >= count for r in rows.values())):
                return rows
        time.sleep(0.3)
    workers_log = (listener.data_dir / "workers.log").read_text(errors="replace")[-4000:]
    raise AssertionError(
        f"studies not done in {timeout} s: {[(r['id'], r['state']) for r in rows.values()]}\n{workers_log}"
    )


def results_of(listener, study_id: int) -> list[dict]:
    return listener.query("SELECT * FROM results_inferenceresult WHERE study_id = ? ORDER BY id", (study_id,))


def timeline(listener, study_id: int) -> list[str]:
    return [
        e["kind"]
        for e in listener.query("SELECT kind FROM routing_studyevent WHERE study_id = ? ORDER BY at, id", (study_id,))
    ]


def test_generated_studies_sent_with_storescu_are_routed_and_inferred(site, tmp_path):
    listener = site
    studies = {
        "lesion": demo_study_write(outdir=tmp_path / "lesion", lesion=True, slices=32, size=256, seed=1),
        "clean": demo_study_write(outdir=tmp_path / "clean", slices=32, size=256, seed=2),
        "chest": demo_study_write(outdir=tmp_path / "chest", body_part="CHEST", slices=8, size=64, seed=3),
        "mr": demo_study_write(outdir=tmp_path / "mr", modality="MR", slices=16, size=64, seed=4),
        "corrupt": demo_study_write(outdir=tmp_path / "corrupt", corrupt_pixels=True, slices=16, size=128, seed=5),
    }
    for study in studies.values():
        send(listener, study.paths)
    rows = wait_final(listener, [s.study_instance_uid for s in studies.values()])
    by_name = {name: rows[s.study_instance_uid] for name, s in studies.items()}

    lesion = by_name["lesion"]
    assert lesion["state"] == "inferred"
    [result] = results_of(listener, lesion["id"])
    assert result["status"] == "succeeded" and result["flagged"] == 1 and result["score"] > 0.5
    assert result["instance_count"] == 32
    assert timeline(listener, lesion["id"]) == ["receiving", "complete", "routed", "inferring", "inferred"]

    clean = by_name["clean"]
    assert clean["state"] == "inferred"
    assert results_of(listener, clean["id"])[0]["flagged"] == 0

    chest = by_name["chest"]
    assert chest["state"] == "ignored" and results_of(listener, chest["id"]) == []
    assert "no rule matched" in timeline_detail(listener, chest["id"], "ignored")

    mr = by_name["mr"]
    assert mr["state"] == "ignored"
    [not_applicable] = results_of(listener, mr["id"])
    assert not_applicable["status"] == "not_applicable" and "accepts CT" in not_applicable["message"]

    corrupt = by_name["corrupt"]
    assert corrupt["state"] == "failed"
    [failure] = results_of(listener, corrupt["id"])
    assert failure["failure_reason"] == "unreadable_pixels"

    # A late instance re-opens the lesion study: it is inferred again and the new result
    # supersedes the first one, which stays as it was.
    late = pydicom.dcmread(studies["lesion"].paths[5])
    late.SOPInstanceUID = pydicom.uid.generate_uid()
    late.InstanceNumber = 33
    late.save_as(tmp_path / "late.dcm", enforce_file_format=True)
    send(listener, [tmp_path / "late.dcm"])
    wait_final(listener, [studies["lesion"].study_instance_uid], count=2)
    first, second = results_of(listener, lesion["id"])
    assert second["supersedes_id"] == first["id"] and second["instance_count"] == 33
    assert first["instance_count"] == 32
    assert "amended" in timeline(listener, lesion["id"])

    # study_status, the support view, shows the routing decision and both results.
    status = subprocess.run(
        [PYTHON, "manage.py", "study_status", studies["lesion"].study_instance_uid],
        cwd=REPO,
        env=base_env(listener.data_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert "Routing    Demo: CT head to the demonstration model" in status.stdout
    assert "FLAGGED" in status.stdout and "[superseded]" in status.stdout


def timeline_detail(listener, study_id: int, kind: str) -> str:
    rows = listener.query("SELECT detail FROM routing_studyevent WHERE study_id = ? AND kind = ?", (study_id, kind))
    return rows[-1]["detail"] if rows else ""
