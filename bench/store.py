"""Benchmark: the durable store step, `routing.store.spool.instance_store`, in one process.

No network: the files are written to `incoming/` as a receiver would (each just before it is
stored, so its data is still dirty in the page cache), then `instance_store` checks, fsyncs,
renames, fsyncs the folder and commits the rows. Two parts:

1. Step costs, one thread, median of many samples: writing the temporary file, fsync vs
   fdatasync of it, re-opening it (the caller hands us a closed file), rename plus directory
   fsync, the structure check, the header parse, the row commit (SQLite as configured, WAL with
   synchronous=FULL, and for comparison synchronous=NORMAL, which does not fsync the WAL).
2. Throughput from 1, 2 and 4 threads (one association row each, the files split between
   them), ~500 kB CT slices and ~40 kB small instances; instances/s and where each instance
   waited (per instance, ms, mean over the run), plus how many file and directory fsyncs the
   process really issued per instance (os.fsync/os.fdatasync are counted, not changed).
   A warm-up plus N rounds; medians over the rounds. A fresh set of rows each run.

    .venv/bin/python bench/store.py [--rounds 5] [--quick] [--threads 1 2 4]

Results go to stdout and bench/out/store-*.json. Everything runs in a temporary directory on the
filesystem of $TMPDIR (say which one when quoting figures: fsync costs are the disk's); the
user's var/ is never touched. Synthetic data only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pacslens.settings")
WORK = Path(tempfile.mkdtemp(prefix="pacslens-bench-store-"))
DATA_DIR = WORK / "data"
os.environ["PACSLENS_DATA_DIR"] = str(DATA_DIR)  # never the user's var/
os.environ.setdefault("PACSLENS_SECRET_KEY", "bench-store-key-not-secret-" + "x" * 40)

import django

from tests.support.listener_proc import template_db_create

OUT = REPO / "bench" / "out"


# --- instrumentation -----------------------------------------------------------------------------


class Steps:
    """Per-thread seconds spent in named steps; totals merged under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.enabled = False

    def add(self, name: str, seconds: float) -> None:
        if self.enabled:
            with self.lock:
                self.seconds[name] += seconds
                self.counts[name] += 1

    def reset(self) -> None:
        with self.lock:
            self.seconds.clear()
            self.counts.clear()

    def timed(self, name: str, func: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        wrapper.__wrapped__ = func  # type: ignore[attr-defined]
        return wrapper


STEPS = Steps()


def instrument() -> None:
    """Time the steps of instance_store from the calling thread's side, and count real fsyncs.

    Wraps module-level names in routing.store.spool (whichever of them exist, so the same
    script measures the code before and after a change) and os.fsync/os.fdatasync (SQLite's
    own fsyncs are C calls and are not counted)."""
    from routing.store import spool

    for name, step in [
        ("dataset_structure_problem", "structure check"),
        ("instance_header_read", "header parse"),
        ("_durable_rename", "rename + dir fsync wait"),
        ("_record", "rows + commit"),
        ("instance_store", "instance_store total"),
    ]:
        if hasattr(spool, name):
            setattr(spool, name, STEPS.timed(step, getattr(spool, name)))

    if hasattr(spool, "group_commit"):
        group_commit = spool.group_commit

        @contextmanager
        def timed_group_commit():
            with group_commit():
                yield
                start = time.perf_counter()  # leaving: the shared WAL fsync
            STEPS.add("WAL fsync wait", time.perf_counter() - start)

        spool.group_commit = timed_group_commit

    start_sync = spool._fsync_start

    def fsync_start(path):
        future = start_sync(path)
        result = future.result

        def timed_result(timeout=None):
            start = time.perf_counter()
            try:
                return result(timeout)
            finally:
                STEPS.add("file fsync wait", time.perf_counter() - start)

        future.result = timed_result  # type: ignore[method-assign]
        return future

    spool._fsync_start = fsync_start

    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def counted(fd, real=real, name=name):
            kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
            start = time.perf_counter()
            try:
                return real(fd)
            finally:
                STEPS.add(f"os.{name} {kind} (any thread)", time.perf_counter() - start)

        setattr(os, name, counted)


# What each variant takes away from the code as it is (names absent from an older checkout are
# skipped, so there every variant is that checkout's code).
VARIANTS: dict[str, dict[str, str]] = {
    "as-is": {},
    "no-wal-group": {"group_commit": "nullcontext"},  # each COMMIT fsyncs the WAL itself (synchronous=FULL)
    "no-group": {"group_commit": "nullcontext", "group_fsync": "plain_fsync"},  # the code before issue 17
}


def variant_apply(name: str) -> Callable[[], None]:
    """Patch routing.store.spool for `name`; returns the undo."""
    from contextlib import nullcontext

    from routing.store import spool

    replacements = {"nullcontext": nullcontext, "plain_fsync": plain_fsync}
    saved = {}
    for attr, replacement in VARIANTS[name].items():
        if hasattr(spool, attr):
            saved[attr] = getattr(spool, attr)
            setattr(spool, attr, replacements[replacement])

    def undo() -> None:
        for attr, value in saved.items():
            setattr(spool, attr, value)

    return undo


def plain_fsync(path: Path) -> None:
    """One fsync per caller, as before the group fsync."""
    from routing.store.group_sync import fsync_path  # after django.setup(), as the other imports here

    fsync_path(path)


# --- data ----------------------------------------------------------------------------------------


class Item:
    def __init__(self, path: Path) -> None:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        self.data = path.read_bytes()
        self.sop_class_uid = str(ds.SOPClassUID)
        self.sop_instance_uid = str(ds.SOPInstanceUID)
        self.transfer_syntax_uid = str(ds.file_meta.TransferSyntaxUID)


def datasets_make(ct_count: int, small_count: int) -> dict[str, list[Item]]:
    from tests.support.ct import ct_series_write

    folders = {"ct": WORK / "gen-ct", "small": WORK / "gen-small"}
    files = {
        "ct": ct_series_write(folders["ct"], ct_count),  # 512 x 512 int16: ~525 kB
        "small": ct_series_write(folders["small"], small_count, rows=140, columns=140, seed=1),  # ~40 kB
    }
    items = {name: [Item(p) for p in paths] for name, paths in files.items()}
    for folder in folders.values():
        shutil.rmtree(folder)
    return items


def temp_write(item: Item) -> Path:
    from routing.store.spool import incoming_dir

    path = incoming_dir() / f"{uuid.uuid4().hex}.tmp"
    with open(path, "wb") as f:
        f.write(item.data)
    return path


def rows_reset() -> None:
    """Forget the previous run: its rows and files (the same UIDs are stored again)."""
    from routing.models import StoreAssociation, Study

    Study.objects.all().delete()
    StoreAssociation.objects.all().delete()
    for path in (DATA_DIR / "instances").rglob("*.dcm"):  # files only: the spool remembers the folders it made
        path.unlink()
    os.sync()  # the deletions' writeback must not land in the next run's fsyncs


# --- part 1: step costs --------------------------------------------------------------------------


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def step_costs(items: list[Item], samples: int) -> dict[str, float]:
    from django.db import connection

    from routing.store.header import instance_header_read
    from routing.store.records import instance_record
    from routing.store.structure import dataset_structure_problem

    real_fsync = getattr(os.fsync, "__wrapped__", os.fsync)
    times: dict[str, list[float]] = defaultdict(list)
    folder = DATA_DIR / "instances" / "steps"
    folder.mkdir(parents=True, exist_ok=True)
    association_id = association_create(0)  # so the rows take the listener's path (the series is known)
    for i in range(samples):
        item = items[i % len(items)]
        for sync_name in ("fsync", "fdatasync"):
            start = time.perf_counter()
            path = temp_write(item)
            times["write temp file"].append(time.perf_counter() - start)
            start = time.perf_counter()
            fd = os.open(path, os.O_RDONLY)
            times["re-open (os.open)"].append(time.perf_counter() - start)
            start = time.perf_counter()
            getattr(os, sync_name)(fd)
            times[f"file {sync_name}"].append(time.perf_counter() - start)
            os.close(fd)
            start = time.perf_counter()
            final = folder / path.name
            os.rename(path, final)
            dir_fd = os.open(folder, os.O_RDONLY)
            real_fsync(dir_fd)
            os.close(dir_fd)
            times["rename + dir fsync"].append(time.perf_counter() - start)
        start = time.perf_counter()
        problem = dataset_structure_problem(final)
        times["structure check"].append(time.perf_counter() - start)
        assert problem is None, problem
        start = time.perf_counter()
        header = instance_header_read(final)
        times["header parse"].append(time.perf_counter() - start)
        for mode in ("FULL", "NORMAL"):
            with connection.cursor() as cursor:
                cursor.execute(f"PRAGMA synchronous={mode}")
            header = {**header, "SOPInstanceUID": f"2.25.{uuid.uuid4().int}"}
            start = time.perf_counter()
            instance_record(
                header=header,
                relative="instances/steps/x.dcm",
                size=len(item.data),
                transfer_syntax_uid=item.transfer_syntax_uid,
                calling_ae_title="BENCH",
                called_ae_title="PACSLENS",
                association_id=association_id,
                sender_id=None,
            )
            times[f"rows + commit, synchronous={mode}"].append(time.perf_counter() - start)
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA synchronous=FULL")
    rows_reset()
    return {name: median_ms(values) for name, values in times.items()}


# --- part 2: throughput --------------------------------------------------------------------------


def association_create(thread: int) -> int:
    from routing.models import StoreAssociation

    return StoreAssociation.objects.create(
        calling_ae_title="BENCH", called_ae_title="PACSLENS", listener=f"t{thread}"
    ).pk


def store_thread(thread: int, chunk: list[Item], errors: list[str], barrier: threading.Barrier) -> None:
    from django.db import connection

    from routing.store import spool

    try:
        association_id = association_create(thread)
        barrier.wait()
        for item in chunk:
            start = time.perf_counter()
            path = temp_write(item)
            STEPS.add("write temp file", time.perf_counter() - start)
            result = spool.instance_store(
                temp_path=path,
                request_sop_class_uid=item.sop_class_uid,
                request_sop_instance_uid=item.sop_instance_uid,
                transfer_syntax_uid=item.transfer_syntax_uid,
                calling_ae_title="BENCH",
                called_ae_title="PACSLENS",
                association_id=association_id,
            )
            if not result.ok or result.duplicate:
                errors.append(f"{item.sop_instance_uid}: {result.status:#06x} {result.message}")
                return
    except Exception as exc:
        errors.append(repr(exc))
        barrier.abort()
    finally:
        connection.close()


def throughput_run(items: list[Item], threads: int) -> dict:
    from routing.models import Instance

    rows_reset()
    errors: list[str] = []
    barrier = threading.Barrier(threads + 1)
    workers = [
        threading.Thread(target=store_thread, args=(i, items[i::threads], errors, barrier)) for i in range(threads)
    ]
    for worker in workers:
        worker.start()
    barrier.wait()
    STEPS.reset()
    STEPS.enabled = True
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - start
    STEPS.enabled = False
    if errors:
        raise SystemExit(f"store failed: {errors[:3]}")
    stored = Instance.objects.count()
    if stored != len(items):
        raise SystemExit(f"stored {stored} of {len(items)} instances")
    n = len(items)
    return {
        "instances_per_s": n / seconds,
        "ms_per_instance": {name: 1000 * s / n for name, s in STEPS.seconds.items()},
        "calls_per_instance": {name: c / n for name, c in STEPS.counts.items()},
    }


def throughput(
    datasets: dict[str, list[Item]], thread_counts: list[int], rounds: int, variants: list[str]
) -> list[dict]:
    rows = []
    for name, items in datasets.items():
        for threads in thread_counts:
            runs: dict[str, list[dict]] = defaultdict(list)
            for round_ in range(rounds + 1):  # round 0 is the warm-up
                # Variants alternate within a round, so they share the machine's load (the disk is shared).
                for variant in variants if round_ % 2 == 0 else variants[::-1]:
                    undo = variant_apply(variant)
                    try:
                        run = throughput_run(items, threads)
                    finally:
                        undo()
                    label = "warm-up" if round_ == 0 else f"round {round_}"
                    print(
                        f"  {name:5} {threads} thread(s) {variant:12} {label:8} {run['instances_per_s']:8.1f} inst/s",
                        flush=True,
                    )
                    if round_:
                        runs[variant].append(run)
            for variant in variants:
                rows.append(row_summarise(name, threads, variant, len(items), runs[variant]))
    return rows


def row_summarise(name: str, threads: int, variant: str, instances: int, runs: list[dict]) -> dict:
    steps = sorted({s for r in runs for s in r["ms_per_instance"]})
    return {
        "dataset": name,
        "threads": threads,
        "variant": variant,
        "instances": instances,
        "instances_per_s": statistics.median(r["instances_per_s"] for r in runs),
        "rounds_instances_per_s": [r["instances_per_s"] for r in runs],
        "ms_per_instance": {s: statistics.median(r["ms_per_instance"].get(s, 0.0) for r in runs) for s in steps},
        "calls_per_instance": {s: statistics.median(r["calls_per_instance"].get(s, 0.0) for r in runs) for s in steps},
    }


STEP_ORDER = [
    "write temp file",
    "structure check",
    "header parse",
    "file fsync wait",
    "rename + dir fsync wait",
    "rows + commit",
    "WAL fsync wait",
    "instance_store total",
]


def ratios_add(rows: list[dict], baseline: str = "no-group") -> None:
    """Each variant against `baseline` run in the same round (so under the same load from the rest
    of the machine): the median of the per-round ratios, steadier than a ratio of medians."""
    by_key = {(r["dataset"], r["threads"], r["variant"]): r for r in rows}
    for row in rows:
        base = by_key.get((row["dataset"], row["threads"], baseline))
        if base is not None and row is not base:
            pairs = zip(row["rounds_instances_per_s"], base["rounds_instances_per_s"])
            row[f"vs_{baseline}"] = statistics.median(a / b for a, b in pairs)


def print_report(costs: dict[str, dict[str, float]], rows: list[dict], args) -> None:
    print("\nStep costs, one thread, median ms per instance:")
    names = list(next(iter(costs.values())))
    print(f"  {'step':38}" + "".join(f"{d:>10}" for d in costs))
    for step in names:
        print(f"  {step:38}" + "".join(f"{costs[d][step]:10.3f}" for d in costs))
    print(
        f"\nThroughput, median of {args.rounds} round(s); time in each step, ms per instance summed over the"
        " threads (with 4 threads, 4 ms of waiting per instance is 1 ms of wall time):"
    )
    for row in rows:
        ms, calls = row["ms_per_instance"], row["calls_per_instance"]
        versus = f", x{row['vs_no-group']:.2f} vs no-group in the same rounds" if "vs_no-group" in row else ""
        print(
            f"  {row['dataset']:5} {row['threads']} thread(s) {row['variant']:12}: {row['instances_per_s']:7.1f} inst/s"
            f"  ({row['instances']} instances{versus})"
        )
        for step in STEP_ORDER:
            if step in ms:
                print(f"      {step:34} {ms[step]:7.3f}")
        for step in sorted(s for s in ms if s.startswith("os.")):
            print(f"      {step:34} {ms[step]:7.3f} ms, {calls[step]:.2f} calls per instance")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--samples", type=int, default=40, help="samples per step cost")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="as-is: the code; no-wal-group: without the shared WAL fsync; no-group: without either (before issue 17)",
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run: 1 round, fewer instances")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.samples = 1, 10
    ct_count, small_count = (40, 100) if args.quick else (150, 500)
    try:
        template_db_create(DATA_DIR)  # migrated in a subprocess, before this process opens it
        django.setup()
        from django.conf import settings

        assert Path(settings.DATA_DIR) == DATA_DIR
        datasets = datasets_make(ct_count, small_count)
        costs = {name: step_costs(items, args.samples) for name, items in datasets.items()}
        instrument()
        rows = throughput(datasets, args.threads, args.rounds, args.variants)
        ratios_add(rows)
        print_report(costs, rows, args)
        OUT.mkdir(parents=True, exist_ok=True)
        out = OUT / f"store-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps({"tmpdir": str(WORK), "step_costs_ms": costs, "throughput": rows}, indent=2))
        print(f"\nwritten {out}")
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
