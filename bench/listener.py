"""Benchmark: the DICOM listener against dcmtk `storescp -od`, both fed by dcmtk `storescu`.

Generates a 300-slice 512x512 CT series and 1,000 small (~40 kB) instances, sends each over
1, 2 and 4 parallel associations (files split between them) to (a) `storescp --fork -od DIR`
and (b) `manage.py dicom_listener` exactly as deployed (durable write, database rows, completion
check enqueued on release), alternating, a warm-up plus N rounds, a fresh store each round.
Then the listener's memory: idle RSS, RSS per idle association, peak RSS receiving one 100 MB
instance.

TCP_NODELAY=1 is in every dcmtk process's environment: Debian's dcmtk leaves Nagle on otherwise
and every instance stalls on a delayed ACK, which would measure the stall, not the software.

    .venv/bin/python bench/listener.py [--rounds 3] [--quick] [--processes 2] [--against DIR]

`--against DIR` adds a third server: the listener of another checkout (say the commit before a
change: `git worktree add /tmp/before <commit>`), alternated with this one in every round, so a
before/after comparison shares the machine's load instead of running at another time. Its own
`.venv` is used when it has one.

Results go to stdout and bench/out/listener-*.json. Everything runs in a temporary directory;
the user's var/ is never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pacslens.settings")
WORK = Path(tempfile.mkdtemp(prefix="pacslens-bench-"))
os.environ["PACSLENS_DATA_DIR"] = str(WORK / "unused-data")  # never the user's var/

import psutil

from tests.support.ct import ct_series_write
from tests.support.listener_proc import (
    ListenerProcess,
    base_env,
    data_dir_create,
    dcmtk_env,
    template_db_create,
)
from tests.support.net import free_port

OUT = REPO / "bench" / "out"
MiB = 1024 * 1024


@dataclass
class Run:
    dataset: str
    server: str
    associations: int
    round: int
    instances: int
    megabytes: float
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.megabytes / self.seconds

    @property
    def cpu_ms_per_instance(self) -> float:
        return 1000 * self.cpu_seconds / self.instances


class TreeSampler:
    """Peak RSS (sum over the process tree) sampled in a thread; CPU time of the tree."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> int:
        total = 0
        for proc in self.tree():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def pss(self) -> int:
        """Proportional set size of the tree: forked workers share their parent's pages, RSS counts them twice."""
        total = 0
        for proc in self.tree():
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
                pass
        return total

    def cpu(self) -> float:
        """User+system seconds of the live tree plus the children it has reaped (storescp --fork)."""
        total = 0.0
        for proc in self.tree():
            try:
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


# --- servers ------------------------------------------------------------------------------------


class Storescp:
    name = "storescp"
    ae_title = "STORESCP"
    host = "127.0.0.1"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True)
        self.port = free_port()
        self.process = subprocess.Popen(
            ["storescp", "--fork", "-aet", self.ae_title, "-od", str(folder), str(self.port)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_echo(self.host, self.port, self.ae_title)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stored(self) -> int:
        return sum(1 for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


class Pacslens:
    name = "pacslens"

    def __init__(self, folder: Path, template_db: Path, processes: int, repo: Path = REPO, **env: str) -> None:
        data_dir = data_dir_create(folder, template_db)
        port = free_port()
        self.listener = ListenerProcess(
            data_dir=data_dir,
            port=port,
            processes=processes,
            env=base_env(data_dir, PACSLENS_DICOM_PORT=str(port), PACSLENS_LOG_LEVEL="WARNING", **env),
            repo=repo,
        ).start()
        self.host, self.port, self.ae_title = self.listener.host, port, self.listener.ae_title

    @property
    def pid(self) -> int:
        return self.listener.process.pid

    def stored(self) -> int:
        return self.listener.instance_count()

    def stop(self) -> None:
        code = self.listener.stop()
        if code != 0:
            raise SystemExit(f"listener exited with {code}:\n{self.listener.log()}")


def wait_echo(host: str, port: int, ae_title: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(
            ["echoscu", "-aec", ae_title, host, str(port)], env=dcmtk_env(), capture_output=True, check=False
        )
        if result.returncode == 0:
            return
        time.sleep(0.1)
    raise SystemExit(f"{ae_title} on port {port} did not answer C-ECHO")


# --- sending -----------------------------------------------------------------------------------


def send(server, files: list[Path], associations: int) -> float:
    """Send `files` split over `associations` parallel storescu processes; seconds until all ended."""
    chunks = [files[i::associations] for i in range(associations)]
    lists = []
    for chunk in chunks:
        # storescu takes its files from the command line; 1,000 paths fit easily.
        lists.append(
            ["storescu", "-aet", "STORESCU", "-aec", server.ae_title, server.host, str(server.port)]
            + [str(f) for f in chunk]
        )
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for cmd in lists]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - start
    for proc, err in zip(procs, errors):
        if proc.returncode != 0:
            raise SystemExit(f"storescu to {server.name} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return elapsed


def measure(server, dataset: str, files: list[Path], associations: int, round_: int, megabytes: float) -> Run:
    sampler = TreeSampler(server.pid)
    cpu_before = sampler.cpu()
    with sampler:
        seconds = send(server, files, associations)
        # storescp's forked children may still be writing their last file when storescu has its answer.
        deadline = time.monotonic() + 30
        while server.stored() < len(files) and time.monotonic() < deadline:
            time.sleep(0.01)
    cpu = sampler.cpu() - cpu_before
    stored = server.stored()
    if stored != len(files):
        raise SystemExit(f"{server.name} stored {stored} of {len(files)} instances")
    return Run(dataset, server.name, associations, round_, len(files), megabytes, seconds, cpu, sampler.peak / MiB)


def throughput(args, datasets: dict[str, list[Path]], template_db: Path, baseline_db: Path | None = None) -> list[Run]:
    runs: list[Run] = []
    counter = 0
    names = [*SERVERS, *(["baseline"] if baseline_db else [])]
    for dataset, files in datasets.items():
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        for associations in args.associations:
            for round_ in range(args.rounds + 1):  # round 0 is the warm-up
                order = names if round_ % 2 == 0 else names[::-1]
                for name in order:
                    counter += 1
                    folder = WORK / "stores" / f"{counter:03d}-{name}"
                    server: Storescp | Pacslens
                    if name == "storescp":
                        server = Storescp(folder)
                    elif name == "baseline":
                        assert baseline_db is not None
                        server = Pacslens(folder, baseline_db, args.processes, repo=args.against.resolve())
                        server.name = "baseline"
                    else:
                        server = Pacslens(folder, template_db, args.processes)
                    try:
                        run = measure(server, dataset, files, associations, round_, megabytes)
                    finally:
                        server.stop()
                        shutil.rmtree(folder, ignore_errors=True)
                    runs.append(run)
                    label = "warm-up" if round_ == 0 else f"round {round_}"
                    print(
                        f"  {dataset:5} {associations} assoc {name:8} {label:8} {run.per_second:8.1f} inst/s "
                        f"{run.mb_per_second:7.1f} MB/s {run.cpu_ms_per_instance:6.2f} ms CPU/inst "
                        f"peak RSS {run.peak_rss_mib:6.1f} MiB",
                        flush=True,
                    )
    return runs


# --- memory ------------------------------------------------------------------------------------


def memory(args, template_db: Path, big_file: Path) -> dict:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    results: dict = {}
    idle_associations = args.idle_associations
    server = Pacslens(
        WORK / "stores" / "memory-idle",
        template_db,
        1,
        PACSLENS_DICOM_MAX_ASSOCIATIONS=str(idle_associations + 5),
        PACSLENS_DICOM_NETWORK_TIMEOUT="600",
        PACSLENS_DICOM_ACSE_TIMEOUT="600",
        PACSLENS_DICOM_DIMSE_TIMEOUT="600",
    )
    try:
        sampler = TreeSampler(server.pid)
        time.sleep(1.0)
        idle = sampler.rss()
        ae = AE(ae_title="PACSLENS_TEST")
        ae.add_requested_context(Verification)
        ae.maximum_associations = idle_associations + 5
        assocs = []
        for _ in range(idle_associations):
            assoc = ae.associate(server.host, server.port, ae_title=server.ae_title)
            if not assoc.is_established:
                raise SystemExit("idle association was not established")
            assocs.append(assoc)
        time.sleep(1.0)
        with_idle = sampler.rss()
        for assoc in assocs:
            assoc.release()
        results["idle_rss_mib"] = idle / MiB
        results["idle_associations"] = idle_associations
        results["rss_with_idle_associations_mib"] = with_idle / MiB
        results["rss_per_idle_association_mib"] = (with_idle - idle) / MiB / idle_associations
    finally:
        server.stop()

    # The deployed default: a supervisor plus worker processes.
    server = Pacslens(WORK / "stores" / "memory-idle-deployed", template_db, args.processes)
    try:
        time.sleep(1.0)
        sampler = TreeSampler(server.pid)
        results[f"idle_rss_{args.processes}_processes_mib"] = sampler.rss() / MiB
        results[f"idle_pss_{args.processes}_processes_mib"] = sampler.pss() / MiB
        results["idle_rss_per_process_mib"] = [round(p.memory_info().rss / MiB, 1) for p in sampler.tree()]
    finally:
        server.stop()

    megabytes = big_file.stat().st_size / 1e6
    for cls in (Storescp, Pacslens):
        folder = WORK / "stores" / f"memory-big-{cls.name}"
        server = cls(folder) if cls is Storescp else cls(folder, template_db, 1)
        try:
            run = measure(server, "100MB", [big_file], 1, 1, megabytes)
        finally:
            server.stop()
            shutil.rmtree(folder, ignore_errors=True)
        results[f"big_instance_peak_rss_{cls.name}_mib"] = run.peak_rss_mib
        results[f"big_instance_seconds_{cls.name}"] = run.seconds
    return results


def big_instance_write(folder: Path) -> Path:
    """One ~100 MB instance: a 10,000 x 5,000 int16 CT image."""
    return ct_series_write(folder, 1, rows=10000, columns=5000)[0]


# --- report ------------------------------------------------------------------------------------


SERVERS = ["storescp", "pacslens"]


def summarise(runs: list[Run]) -> list[dict]:
    rows = []
    keys = sorted({(r.dataset, r.associations) for r in runs}, key=lambda k: (k[0] != "ct", k[1]))
    servers = [name for name in (*SERVERS, "baseline") if any(r.server == name for r in runs)]
    for dataset, associations in keys:
        row: dict = {"dataset": dataset, "associations": associations}
        for server in servers:
            measured = [
                r
                for r in runs
                if (r.dataset, r.associations, r.server) == (dataset, associations, server) and r.round > 0
            ]
            row[server] = {
                "instances_per_s": statistics.median(r.per_second for r in measured),
                "mb_per_s": statistics.median(r.mb_per_second for r in measured),
                "cpu_ms_per_instance": statistics.median(r.cpu_ms_per_instance for r in measured),
                "peak_rss_mib": max(r.peak_rss_mib for r in measured),
            }
        row["ratio"] = row["pacslens"]["instances_per_s"] / row["storescp"]["instances_per_s"]
        if "baseline" in row:
            row["vs_baseline"] = row["pacslens"]["instances_per_s"] / row["baseline"]["instances_per_s"]
        rows.append(row)
    return rows


def print_summary(rows: list[dict], memory_results: dict, args) -> None:
    print(f"\nMedian of {args.rounds} rounds (listener: {args.processes} process(es); storescp --fork -od)")
    print(
        f"{'dataset':7} {'assoc':>5} | {'storescp inst/s':>15} {'MB/s':>7} {'CPU ms':>7} | "
        f"{'pacslens inst/s':>15} {'MB/s':>7} {'CPU ms':>7} {'peak RSS':>9} | {'ratio':>5}"
    )
    for row in rows:
        s, p = row["storescp"], row["pacslens"]
        print(
            f"{row['dataset']:7} {row['associations']:>5} | {s['instances_per_s']:15.1f} {s['mb_per_s']:7.1f} "
            f"{s['cpu_ms_per_instance']:7.2f} | {p['instances_per_s']:15.1f} {p['mb_per_s']:7.1f} "
            f"{p['cpu_ms_per_instance']:7.2f} {p['peak_rss_mib']:8.1f}M | {row['ratio']:5.2f}"
        )
    if any("baseline" in row for row in rows):
        print(f"\nAgainst the baseline checkout {args.against}")
        print(
            f"{'dataset':7} {'assoc':>5} | {'baseline inst/s':>15} {'CPU ms':>7} | {'pacslens inst/s':>15} {'CPU ms':>7} | {'ratio':>5}"
        )
        for row in rows:
            b, p = row["baseline"], row["pacslens"]
            print(
                f"{row['dataset']:7} {row['associations']:>5} | {b['instances_per_s']:15.1f} "
                f"{b['cpu_ms_per_instance']:7.2f} | {p['instances_per_s']:15.1f} {p['cpu_ms_per_instance']:7.2f} | "
                f"{row['vs_baseline']:5.2f}"
            )
    if memory_results:
        print("\nListener memory")
        for key, value in memory_results.items():
            print(f"  {key:45} {value:10.2f}" if isinstance(value, float) else f"  {key:45} {value!s:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2, help="listener processes (the deployed default is 2)")
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--datasets", nargs="+", default=["ct", "small"], choices=["ct", "small"])
    parser.add_argument("--idle-associations", type=int, default=50)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a small smoke run: 1 round, fewer instances")
    parser.add_argument("--against", type=Path, help="another checkout whose listener runs as the baseline")
    args = parser.parse_args()
    if args.against and not (args.against / "manage.py").exists():
        raise SystemExit(f"{args.against} is not a PacsLens checkout (no manage.py)")
    if not shutil.which("storescu") or not shutil.which("storescp"):
        raise SystemExit("dcmtk is not installed (apt-get install dcmtk)")
    if args.quick:
        args.rounds = 1
    ct_count, small_count = (60, 200) if args.quick else (300, 1000)

    try:
        print(f"generating test data in {WORK} ...", flush=True)
        datasets = {}
        if "ct" in args.datasets:
            datasets["ct"] = ct_series_write(WORK / "ct", ct_count)
        if "small" in args.datasets:
            # 140 x 140 int16: ~39 kB of pixels plus the header, ~40 kB per file.
            datasets["small"] = ct_series_write(WORK / "small", small_count, rows=140, columns=140, seed=1)
        template_db = template_db_create(WORK / "template")
        baseline_db = template_db_create(WORK / "baseline", repo=args.against.resolve()) if args.against else None
        for name, files in datasets.items():
            size = sum(f.stat().st_size for f in files)
            print(f"  {name}: {len(files)} instances, {size / len(files) / 1e3:.0f} kB each, {size / 1e6:.0f} MB")
        print(f"cpus: {os.cpu_count()}; rounds: warm-up + {args.rounds}", flush=True)
        runs = throughput(args, datasets, template_db, baseline_db)
        memory_results = {}
        if not args.no_memory:
            memory_results = memory(args, template_db, big_instance_write(WORK / "big"))
        rows = summarise(runs)
        print_summary(rows, memory_results, args)
        OUT.mkdir(parents=True, exist_ok=True)
        out = OUT / f"listener-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(
            json.dumps(
                {
                    "args": {
                        key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
                    },
                    "cpus": os.cpu_count(),
                    "summary": rows,
                    "memory": memory_results,
                    "runs": [dict(r.__dict__, per_second=r.per_second) for r in runs],
                },
                indent=2,
            )
        )
        print(f"\nwritten {out.relative_to(REPO)}")
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
