"""Run every benchmark in bench/ in turn (`make bench`): each `bench/*.py` except this file and
the helpers (`_*.py`).

Extra arguments are passed to every benchmark (e.g. `--quick`). Each benchmark's output is shown
as it comes; the "Targets" blocks they end with (bench/_targets.py: issue 17's targets, MET or NOT
MET) are printed again together at the end. Exits non-zero if one failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench._targets import HEADER


def main() -> int:
    scripts = sorted(
        p for p in BENCH.glob("*.py") if p.name not in {"run.py", "__init__.py"} and not p.name.startswith("_")
    )
    failed = []
    blocks: list[list[str]] = []
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        code, found = script_run(script, sys.argv[1:])
        blocks.extend(found)
        if code != 0:
            failed.append(f"{script.name} (exit {code})")
    print(f"\n=== {HEADER}, all benchmarks ===")
    for block in blocks:
        print("\n".join(block) + "\n")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def script_run(script: Path, args: list[str]) -> tuple[int, list[list[str]]]:
    """Run `script`, echoing its output line by line; return its exit code and its Targets blocks."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    blocks: list[list[str]] = []
    block: list[str] | None = None
    with subprocess.Popen(
        [sys.executable, str(script), *args], cwd=BENCH.parent, env=env, stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            print(line, end="", flush=True)
            line = line.rstrip("\n")
            if line.startswith(f"{HEADER} ("):
                block = [line]
                blocks.append(block)
            elif block is not None and line.strip():
                block.append(line)
            else:
                block = None
    return process.returncode, blocks


if __name__ == "__main__":
    sys.exit(main())
