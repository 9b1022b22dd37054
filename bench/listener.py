"""Benchmark: the DICOM listener against dcmtk `storescp -od`, both fed by dcmtk `storescu`.

Generates a 300-slice 512x512 CT series and 1,000 small (~40 kB) instances, sends each over
1, 2 and 4 parallel associations (files split between them) to (a) `storescp --fork -od DIR`
and (b) `manage.py dicom_listener` exactly as deployed (durable write, database rows, completion
check enqueued on release), alternating, a warm-up plus N rounds (5 by default), a fresh store
each round. Before every round the files get new Study/Series/SOP Instance UIDs (outside the
timed part), so no round re-sends instances a store has seen. Then the deployed listener's
memory: idle RSS and PSS per process, RSS per idle association, peak RSS receiving one 100 MB
instance.

It ends with the targets of issue 17, each MET or NOT MET (bench/_targets.py): the throughput
ratios are the median over the rounds of PacsLens's instances/s divided by storescp's in the
same round. The memory targets use one process's RSS, which is what an operator sees in `top`:
idle, the largest process of the listener (the supervisor included); the 100 MB instance, the
process that received it. The sums over the processes, RSS and PSS, are printed beside them.

TCP_NODELAY=1 is in every dcmtk process's environment: Debian's dcmtk leaves Nagle on otherwise
and every instance stalls on a delayed ACK, which would measure the stall, not the software.

    .venv/bin/python bench/listener.py [--rounds 5] [--quick] [--processes 2] [--against DIR]

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

from bench._targets import Target, targets_print
from bench._uids import uids_refresh
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
    peak_rss_mib: float  # the sum over the process tree
    peak_process_rss_mib: float  # the largest single process
    busiest_peak_rss_mib: float  # the process whose RSS grew most: the one that received
    busiest_growth_mib: float  # its growth over its RSS before the send

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
    """Peak RSS (sum over the process tree, and of its largest process) sampled in a thread; CPU time of the tree."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.start = self.rss_per_process()
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> int:
        return sum(self.rss_per_process().values())

    def rss_per_process(self) -> dict[str, int]:
        """RSS of each process by role: the supervisor and the listener processes it forked."""
        return self._per_process(lambda proc: proc.memory_info().rss)

    def pss_per_process(self) -> dict[str, int]:
        """Proportional set size: forked processes share their parent's pages, which RSS counts in each."""
        return self._per_process(lambda proc: proc.memory_full_info().pss)

    def _per_process(self, size) -> dict[str, int]:
        tree = self.tree()
        sizes = {}
        for index, proc in enumerate(tree):
            label = f"listener {index}" if index else ("supervisor" if len(tree) > 1 else "listener")
            try:
                sizes[label] = size(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return sizes

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
            self._sample()
            self._stop.wait(self.interval)

    def _sample(self) -> None:
        sizes = self.rss_per_process()
        self.peak = max(self.peak, sum(sizes.values()))
        for label, size in sizes.items():
            self.peaks[label] = max(self.peaks.get(label, 0), size)

    @property
    def peak_process(self) -> int:
        return max(self.peaks.values(), default=0)

    def busiest(self) -> tuple[int, int]:
        """(peak RSS, growth) of the process whose RSS grew the most since the sampler was made."""
        growth = {label: peak - self.start.get(label, 0) for label, peak in self.peaks.items()}
        label = max(growth, key=lambda k: growth[k])
        return self.peaks[label], growth[label]

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


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
    return Run(
        dataset,
        server.name,
        associations,
        round_,
        len(files),
        megabytes,
        seconds,
        cpu,
        sampler.peak / MiB,
        sampler.peak_process / MiB,
        *(size / MiB for size in sampler.busiest()),
    )


def throughput(args, datasets: dict[str, list[Path]], template_db: Path, baseline_db: Path | None = None) -> list[Run]:
    runs: list[Run] = []
    counter = 0
    names = [*SERVERS, *(["baseline"] if baseline_db else [])]
    for dataset, files in datasets.items():
        for associations in args.associations:
            for round_ in range(args.rounds + 1):  # round 0 is the warm-up
                # A new study every round, before the clock starts: a store short-cuts a duplicate.
                uids_refresh(files)
                megabytes = sum(f.stat().st_size for f in files) / 1e6
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
    """The listener as deployed (`args.processes` processes): idle, with idle associations, receiving 100 MB."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    results: dict = {"processes": args.processes}
    idle_associations = args.idle_associations
    limit = str(idle_associations + 5)  # per process: the associations may all land on one
    server = Pacslens(
        WORK / "stores" / "memory-idle",
        template_db,
        args.processes,
        PACSLENS_DICOM_MAX_ASSOCIATIONS=limit,
        PACSLENS_DICOM_MAX_ASSOCIATIONS_PER_PEER=limit,
        PACSLENS_DICOM_NETWORK_TIMEOUT="600",
        PACSLENS_DICOM_ACSE_TIMEOUT="600",
        PACSLENS_DICOM_DIMSE_TIMEOUT="600",
    )
    try:
        sampler = TreeSampler(server.pid)
        time.sleep(2.0)  # past start-up: the forked processes have answered their first C-ECHO
        rss = sampler.rss_per_process()
        pss = sampler.pss_per_process()
        results["idle_rss_per_process_mib"] = {k: round(v / MiB, 1) for k, v in rss.items()}
        results["idle_pss_per_process_mib"] = {k: round(v / MiB, 1) for k, v in pss.items()}
        results["idle_rss_sum_mib"] = sum(rss.values()) / MiB
        results["idle_pss_sum_mib"] = sum(pss.values()) / MiB
        results["idle_rss_largest_process_mib"] = max(rss.values()) / MiB
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
        with_idle_pss = sum(sampler.pss_per_process().values())
        for assoc in assocs:
            assoc.release()
        results["idle_associations"] = idle_associations
        results["rss_sum_with_idle_associations_mib"] = with_idle / MiB
        results["rss_per_idle_association_mib"] = (with_idle - sum(rss.values())) / MiB / idle_associations
        results["pss_per_idle_association_mib"] = (with_idle_pss - sum(pss.values())) / MiB / idle_associations
    finally:
        server.stop()

    megabytes = big_file.stat().st_size / 1e6
    for cls in (Storescp, Pacslens):
        folder = WORK / "stores" / f"memory-big-{cls.name}"
        server = cls(folder) if cls is Storescp else cls(folder, template_db, args.processes)
        try:
            run = measure(server, "100MB", [big_file], 1, 1, megabytes)
        finally:
            server.stop()
            shutil.rmtree(folder, ignore_errors=True)
        results[f"big_instance_peak_rss_receiving_process_{cls.name}_mib"] = run.busiest_peak_rss_mib
        results[f"big_instance_rss_growth_receiving_process_{cls.name}_mib"] = run.busiest_growth_mib
        results[f"big_instance_peak_rss_largest_process_{cls.name}_mib"] = run.peak_process_rss_mib
        results[f"big_instance_peak_rss_sum_{cls.name}_mib"] = run.peak_rss_mib
        results[f"big_instance_seconds_{cls.name}"] = run.seconds
    results["big_instance_megabytes"] = megabytes
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
        row: dict = {"dataset": dataset, "associations": associations, "instances": 0}
        measured = [r for r in runs if (r.dataset, r.associations) == (dataset, associations) and r.round > 0]
        for server in servers:
            mine = [r for r in measured if r.server == server]
            row["instances"] = mine[0].instances
            row[server] = {
                "instances_per_s": statistics.median(r.per_second for r in mine),
                "mb_per_s": statistics.median(r.mb_per_second for r in mine),
                "cpu_ms_per_instance": statistics.median(r.cpu_ms_per_instance for r in mine),
                "peak_rss_mib": max(r.peak_rss_mib for r in mine),
            }
        # Each round's servers ran back to back under the same load: compare within the round.
        row["ratio"] = round_ratio_median(measured, "pacslens", "storescp")
        if "baseline" in row:
            row["vs_baseline"] = round_ratio_median(measured, "pacslens", "baseline")
        rows.append(row)
    return rows


def round_ratio_median(runs: list[Run], server: str, reference: str) -> float:
    """Median over the rounds of `server`'s instances/s divided by `reference`'s in the same round."""
    by_round = {(r.round, r.server): r.per_second for r in runs}
    rounds = sorted({r.round for r in runs})
    return statistics.median(by_round[(n, server)] / by_round[(n, reference)] for n in rounds)


def print_summary(rows: list[dict], memory_results: dict, args) -> None:
    print(
        f"\nMedian of {args.rounds} rounds (listener: {args.processes} process(es); storescp --fork -od; "
        "ratio: the median of the rounds' PacsLens ÷ storescp)"
    )
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
        print(f"\nListener memory ({memory_results['processes']} process(es) as deployed)")
        for key, value in memory_results.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v:.1f}" for k, v in value.items())
                print(f"  {key:56} {value}")
            else:
                print(f"  {key:56} {value:10.2f}" if isinstance(value, float) else f"  {key:56} {value!s:>10}")


def targets(rows: list[dict], memory_results: dict, args) -> list[Target]:
    """Issue 17's listener targets, from the summary rows and the memory figures."""

    def ratio(dataset: str, associations: int) -> float | None:
        found = [r["ratio"] for r in rows if (r["dataset"], r["associations"]) == (dataset, associations)]
        return found[0] if found else None

    small = next((r["instances"] for r in rows if r["dataset"] == "small"), 1000)
    versus = "storescp --fork"
    return [
        Target("4 assoc CT", ratio("ct", 4), 0.50, at_least=True, unit="×", note=versus),
        Target("1 assoc CT", ratio("ct", 1), 0.35, at_least=True, unit="×", note=versus),
        Target(f"{small:,} small (~40 kB), 1 assoc", ratio("small", 1), 0.35, at_least=True, unit="×", note=versus),
        Target(
            "idle RSS, largest listener process",
            memory_results.get("idle_rss_largest_process_mib"),
            100,
            at_least=False,
            unit=" MiB",
            digits=1,
        ),
        Target(
            "RSS per idle association",
            memory_results.get("rss_per_idle_association_mib"),
            2,
            at_least=False,
            unit=" MiB",
        ),
        Target(
            "100 MB instance, peak RSS of the receiving process",
            memory_results.get("big_instance_peak_rss_receiving_process_pacslens_mib"),
            100,
            at_least=False,
            unit=" MiB",
            digits=1,
        ),
    ]


def target_notes(memory_results: dict, args, load_before: float) -> list[str]:
    notes = [
        f"throughput: median over {args.rounds} alternating round(s) of PacsLens inst/s ÷ storescp --fork -od "
        f"inst/s in the same round; new Study/Series/SOP Instance UIDs every round; listener as deployed, "
        f"{args.processes} process(es)",
    ]
    if memory_results:
        per_process = ", ".join(f"{k} {v:.1f}" for k, v in memory_results["idle_rss_per_process_mib"].items())
        notes.append(
            "memory: per-process RSS, what an operator sees in `top` (idle: the largest process of the listener, "
            "supervisor included; 100 MB instance: the process that received it, which grew by "
            f"{memory_results['big_instance_rss_growth_receiving_process_pacslens_mib']:.1f} MiB); idle RSS per "
            f"process {per_process} MiB, summed {memory_results['idle_rss_sum_mib']:.1f} MiB RSS / "
            f"{memory_results['idle_pss_sum_mib']:.1f} MiB PSS (forked processes share pages: the RSS sum counts "
            f"them in each); per idle association: the summed RSS growth over "
            f"{memory_results['idle_associations']} associations"
        )
    notes.append(
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores "
        "(a shared machine lowers both servers' figures, the ratios less)"
    )
    if args.quick:
        notes.append("--quick: a smoke run (fewer instances, 1 round), not the issue's conditions")
    return notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
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

    load_before = os.getloadavg()[0]
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
        print(f"cpus: {os.cpu_count()}; load average {load_before:.1f}; rounds: warm-up + {args.rounds}", flush=True)
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
                    "targets": [dict(t.__dict__, met=t.met) for t in targets(rows, memory_results, args)],
                    "runs": [dict(r.__dict__, per_second=r.per_second) for r in runs],
                },
                indent=2,
            )
        )
        print(f"\nwritten {out.relative_to(REPO)}")
        targets_print(
            "bench/listener.py",
            targets(rows, memory_results, args),
            notes=target_notes(memory_results, args, load_before),
        )
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
