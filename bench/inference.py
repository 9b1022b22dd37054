"""Benchmark: per-study inference time of the demonstration model on 300-slice 512x512 head CTs.

Generates N synthetic studies (half with a lesion) in a separate process, ingests them as the
listener would, routes them, then runs the real worker path (claim → choose series → load →
preprocess → onnxruntime → result row) on each in this process, like one worker. Reports
load / preprocess / infer / total p50 and p95, the time numpy alone takes to read the same
files' bytes (the floor for loading), and the worker's peak RSS.

    .venv/bin/python bench/inference.py [--studies 20] [--slices 300] [--quick]

Target (issue 3): total p95 under 2 s on 2 cores, loading within 2x of the numpy floor.
Results go to stdout and bench/out/inference-*.json; everything runs in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WORK = Path(tempfile.mkdtemp(prefix="pacslens-bench-inference-"))
os.environ["DJANGO_SETTINGS_MODULE"] = "pacslens.settings"
(WORK / "data").mkdir()
os.environ["PACSLENS_DATA_DIR"] = str(WORK / "data")  # never the user's var/
os.environ.setdefault("PACSLENS_SECRET_KEY", "bench-only-" + "x" * 50)
OUT = REPO / "bench" / "out"
MiB = 1024 * 1024


def generate(args: tuple[Path, bool, int, int]) -> tuple[str, list[str]]:
    """In a child process, so generating 150 MB studies does not count in the worker's RSS."""
    from pacslens.demo_study import demo_study_write

    outdir, lesion, slices, seed = args
    study = demo_study_write(outdir=outdir, lesion=lesion, slices=slices, seed=seed)
    return study.study_instance_uid, [str(p) for p in study.paths]


def numpy_floor(paths: list[Path], pixel_bytes: int) -> float:
    """Read every file and view its pixel bytes with numpy: no DICOM parsing at all."""
    import numpy as np

    started = time.perf_counter()
    for path in paths:
        with open(path, "rb") as fh:
            data = fh.read()
        np.frombuffer(data, dtype=np.uint16, count=pixel_bytes // 2, offset=len(data) - pixel_bytes)
    return time.perf_counter() - started


class PeakRss:
    """Samples this process's RSS every 5 ms while running (ru_maxrss also counts setup)."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="5 studies of 100 slices")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.slices = 5, 100
    try:
        return run(args)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from results.inference.demo_model import ensure_demo_setup
    from results.inference.services import study_claim_next, study_infer
    from results.models import InferenceResult
    from routing.models import Study, StudyState
    from routing.rules import study_route
    from routing.store.spool import incoming_dir, instance_store

    call_command("migrate", verbosity=0)
    print(ensure_demo_setup())
    print(f"generating {args.studies} studies of {args.slices} slices 512x512 ...", flush=True)
    jobs = [(WORK / "studies" / f"s{i:02d}", i % 2 == 0, args.slices, i) for i in range(args.studies)]
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        generated = pool.map(generate, jobs)
    print(
        f"  generated in {time.perf_counter() - started:.1f} s ({(time.perf_counter() - started) / args.studies:.2f} s per study)"
    )

    import pydicom

    lesion_uids = {uid for (uid, _), job in zip(generated, jobs, strict=True) if job[1]}
    for uid, paths in generated:
        for path in map(Path, paths):
            header = pydicom.dcmread(path, stop_before_pixels=True)
            temp = incoming_dir() / f"{header.SOPInstanceUID}.tmp"
            os.replace(path, temp)
            result = instance_store(
                temp_path=temp,
                request_sop_class_uid=header.SOPClassUID,
                request_sop_instance_uid=header.SOPInstanceUID,
                transfer_syntax_uid=header.file_meta.TransferSyntaxUID,
                calling_ae_title="BENCH",
            )
            assert result.ok, result.message
        study = Study.objects.get(study_instance_uid=uid)
        study.transition(StudyState.COMPLETE, from_states=[StudyState.RECEIVING])
        study_route(study=study)
    print(
        f"ingested and routed; provider {settings.INFERENCE_PROVIDER}, intra-op threads "
        f"{settings.INFERENCE_INTRA_OP_THREADS or 'all'}, {os.cpu_count()} cores",
        flush=True,
    )

    import psutil

    baseline_rss = psutil.Process().memory_info().rss
    rows = []
    with PeakRss() as peak:
        while True:
            began = time.perf_counter()
            study = study_claim_next()
            if study is None:
                break
            study_infer(study=study)
            total = time.perf_counter() - began
            result = InferenceResult.objects.get(study=study)
            paths = [Path(settings.DATA_DIR) / p for p in study.instances.values_list("path", flat=True)]
            rows.append(
                {
                    "study": study.pk,
                    "lesion": study.study_instance_uid in lesion_uids,
                    "status": result.status,
                    "score": result.score,
                    "flagged": result.flagged,
                    "instances": result.instance_count,
                    "load": result.load_seconds,
                    "preprocess": result.preprocess_seconds,
                    "infer": result.infer_seconds,
                    "total": total,
                    "numpy_floor": numpy_floor(paths, 512 * 512 * 2),
                }
            )
    first_session = rows[0]
    steady = rows[1:] or rows  # the first run also creates the onnxruntime session: reported apart
    report = {
        "studies": len(rows),
        "slices": args.slices,
        "cores": os.cpu_count(),
        "first_study_total_s": round(first_session["total"], 4),
        "baseline_rss_mib": round(baseline_rss / MiB, 1),
        "peak_rss_mib": round(peak.peak / MiB, 1),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rows": rows,
    }
    print(f"\n{'step':<12}{'p50 s':>9}{'p95 s':>9}   over {len(rows)} studies of {args.slices} slices")
    for key in ("load", "preprocess", "infer", "total", "numpy_floor"):
        values = [r[key] for r in rows]
        report[f"{key}_p50_s"] = round(pct(values, 50), 4)
        report[f"{key}_p95_s"] = round(pct(values, 95), 4)
        print(f"{key:<12}{report[f'{key}_p50_s']:>9.3f}{report[f'{key}_p95_s']:>9.3f}")
    ratio = report["load_p50_s"] / report["numpy_floor_p50_s"]
    report["load_over_numpy_floor_p50"] = round(ratio, 2)
    print(f"\nload / numpy floor (p50): {ratio:.2f}x   (target <= 2x)")
    print(
        f"first study (creates the session): {first_session['total']:.3f} s; steady p95 {pct([r['total'] for r in steady], 95):.3f} s"
    )
    print(
        f"worker RSS: {report['baseline_rss_mib']} MiB before, peak {report['peak_rss_mib']} MiB during inference "
        f"(ru_maxrss {report['ru_maxrss_mib']} MiB)"
    )
    wrong = [r for r in rows if r["status"] != "succeeded" or r["flagged"] != r["lesion"]]
    target = report["total_p95_s"] < 2.0
    print(
        f"total p95 {report['total_p95_s']:.3f} s: {'meets' if target else 'MISSES'} the 2 s target; "
        f"{len(rows) - len(wrong)}/{len(rows)} studies classified as generated"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"inference-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"written {out.relative_to(REPO)}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
