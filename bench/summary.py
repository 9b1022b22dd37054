"""Benchmark: what the summary image costs, per study.

- finding the key slice and region (results/key_region.py) in the volume the model read: the
  inference step pays this for every study, flagged or not;
- building the summary image (Secondary Capture) and the key object selection for a flagged
  study (the delivery pays this on every attempt), beside building the SR alone.

Synthetic head CTs (make_demo_study's generator) of 48 slices at 512 x 512, with and without a
lesion. Nothing is written outside a temporary directory; no database is needed.

    .venv/bin/python bench/summary.py [--runs 5] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pacslens.settings")

import django

django.setup()

import pydicom

from pacslens.demo_study import demo_study_write
from results.deliver.payload import ResultIdentity, ResultPayload
from results.deliver.sr import build_sr
from results.deliver.summary import build_key_objects, build_summary_image
from results.key_region import key_region_find


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 runs")
    args = parser.parse_args()
    runs = 2 if args.quick else args.runs
    with tempfile.TemporaryDirectory(prefix="pacslens-bench-summary-") as tmp:
        for lesion in (False, True):
            study = demo_study_write(outdir=Path(tmp) / str(lesion), slices=48, size=512, lesion=lesion, seed=7)
            datasets = sorted(
                (pydicom.dcmread(p) for p in study.paths), key=lambda ds: float(ds.ImagePositionPatient[2])
            )
            volume = SimpleNamespace(
                stored=np.stack([ds.pixel_array for ds in datasets]),
                slopes=np.array([float(ds.RescaleSlope) for ds in datasets], dtype=np.float32),
                intercepts=np.array([float(ds.RescaleIntercept) for ds in datasets], dtype=np.float32),
            )
            ids = list(range(len(datasets)))
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                region = key_region_find(volume=volume, instance_ids=ids)
                times.append(time.perf_counter() - started)
            label = "lesion" if lesion else "clean "
            print(f"key region, 48 x 512 x 512, {label}: median {statistics.median(times) * 1000:6.0f} ms  -> {region}")
            if not lesion or region is None:
                continue
            paths = [
                Path(p) for p in sorted(study.paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
            ]
            payload = ResultPayload(
                study_instance_uid=study.study_instance_uid,
                accession_number="BENCH",
                patient_id="ZZBENCH",
                patient_name="ZZDEMO^BENCH",
                triage_score=0.97,
                finding_flag=True,
                model_name="demo-hyperdense-head-ct",
                model_version="1.0",
                identity=ResultIdentity(uuid.uuid4(), uuid.uuid4()),
                created_at=dt.datetime.now(dt.UTC),
                source_instances=tuple(paths),
                key_image=paths[region["instance"]],
                key_bbox=tuple(region["bbox"]),
                finding="hyperdense region",
            )
            for name, build in (
                ("SR alone", partial(build_sr, payload)),
                ("summary image (SC)", partial(build_summary_image, payload)),
                ("key objects (KOS)", partial(build_key_objects, payload)),
            ):
                times = []
                for _ in range(runs):
                    started = time.perf_counter()
                    build()
                    times.append(time.perf_counter() - started)
                print(f"build {name:20s}: median {statistics.median(times) * 1000:6.0f} ms")
    print(f"(load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
