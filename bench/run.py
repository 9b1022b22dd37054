"""Run every benchmark in bench/ in turn (`make bench`): each `bench/*.py` except this file.

Extra arguments are passed to every benchmark (e.g. `--quick`). Exits non-zero if one failed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(
        p for p in BENCH.glob("*.py") if p.name not in {"run.py", "__init__.py"} and not p.name.startswith("_")
    )
    failed = []
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        code = subprocess.call([sys.executable, str(script), *sys.argv[1:]], cwd=BENCH.parent)
        if code != 0:
            failed.append(f"{script.name} (exit {code})")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
