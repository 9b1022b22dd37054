"""The benchmarks' helpers (bench/_uids.py, bench/_targets.py, bench/run.py): what they print and
rewrite, never how fast anything is."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom

from bench._targets import Target
from bench._uids import uids_refresh
from bench.run import script_run
from tests.support.ct import ct_series_write
from tests.support.net import require_program


def uids(path: Path) -> tuple[str, str, str, str]:
    ds = pydicom.dcmread(path)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID


def test_uids_refresh_makes_a_new_study_of_valid_files(tmp_path: Path) -> None:
    paths = ct_series_write(tmp_path, 3, rows=16, columns=16)
    before = [uids(p) for p in paths]
    pixels = [pydicom.dcmread(p).PixelData for p in paths]

    study = uids_refresh(paths)

    after = [uids(p) for p in paths]
    assert {a[0] for a in after} == {study}
    assert len({a[1] for a in after}) == 1
    assert all(a[2] == a[3] for a in after)  # the file meta names the same instance
    assert len({a[2] for a in after}) == 3
    assert not {u for b in before for u in b} & {u for a in after for u in a}
    assert [pydicom.dcmread(p).PixelData for p in paths] == pixels
    dcmftest = require_program("dcmftest")
    for path in paths:
        checked = subprocess.run([dcmftest, str(path)], capture_output=True, text=True, check=False)
        assert checked.returncode == 0 and checked.stdout.startswith("yes:"), checked.stdout


def test_target_lines_say_met_not_met_or_not_measured() -> None:
    assert (
        Target("4 assoc CT", 0.312, 0.5, at_least=True, unit="×", note="storescp --fork").line()
        == "4 assoc CT: 0.31× storescp --fork (target ≥ 0.50×)  NOT MET"
    )
    assert Target("idle RSS", 99.94, 100, at_least=False, unit=" MiB", digits=1).line() == (
        "idle RSS: 99.9 MiB (target ≤ 100.0 MiB)  MET"
    )
    assert Target("studies/hour", 12345, 10_000, at_least=True, digits=0).line() == (
        "studies/hour: 12,345 (target ≥ 10,000)  MET"
    )
    assert Target("p95", None, 5, at_least=False).line() == "p95: not measured (target ≤ 5.00)  NOT MEASURED"


def test_run_collects_the_targets_blocks(tmp_path: Path) -> None:
    script = tmp_path / "fake_bench.py"
    script.write_text(
        "print('figures')\n"
        "print('Targets: p95 < 3 s (an older benchmark\\'s line, not a block)')\n"
        "print('  not collected')\n"
        "print()\n"
        "print('Targets (fake_bench.py)')\n"
        "print('  a: 1 (target ≥ 2)  NOT MET')\n"
        "print()\n"
        "print('after the block')\n"
        "raise SystemExit(3)\n"
    )
    code, blocks = script_run(script, [])
    assert code == 3
    assert blocks == [["Targets (fake_bench.py)", "  a: 1 (target ≥ 2)  NOT MET"]]
