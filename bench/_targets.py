"""The "Targets" block each benchmark ends with: one line per target of issue 17, the measured
figure beside it and MET / NOT MET.

    Targets (bench/listener.py)
      4 assoc CT: 0.31× storescp --fork (target ≥ 0.50×)  NOT MET

bench/run.py (`make bench`) collects every block (from a line starting with "Targets (" to the
next blank line) and prints them together at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

HEADER = "Targets"


@dataclass(frozen=True)
class Target:
    """One target: `label: measured (target ≥/≤ bound)  MET`. `measured` None: not measured this run."""

    label: str
    measured: float | None
    bound: float
    at_least: bool  # True: the figure must be ≥ bound; False: ≤ bound
    unit: str = ""
    digits: int = 2
    note: str = ""  # after the figure, e.g. "storescp --fork"

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.bound if self.at_least else self.measured <= self.bound

    def line(self) -> str:
        sign = "≥" if self.at_least else "≤"
        target = f"(target {sign} {self.bound:,.{self.digits}f}{self.unit})"
        if self.measured is None:
            return f"{self.label}: not measured {target}  NOT MEASURED"
        figure = f"{self.measured:,.{self.digits}f}{self.unit}" + (f" {self.note}" if self.note else "")
        return f"{self.label}: {figure} {target}  {'MET' if self.met else 'NOT MET'}"


def targets_print(script: str, targets: Sequence[Target], *, notes: Sequence[str] = ()) -> None:
    """Print the block: the header, one line per target, `notes` (how the figures were taken), a blank line."""
    print(f"\n{HEADER} ({script})")
    for target in targets:
        print(f"  {target.line()}")
    for note in notes:
        print(f"  - {note}")
    print(flush=True)
