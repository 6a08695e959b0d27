"""Shared machinery for bench/: repeat, take the median and spread, and print ratios.

Every benchmark measures Stoker and its reference in the same run, alternating them so both
see the same machine state, and reports ratio = Stoker's rate / the reference's rate
(>= 1.0 means Stoker is at least as fast). The Stoker side of each measurement lives in
engine/benchmark/ (shipped, and used by `stoker bench` too); bench/ adds the references.
"""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from engine.benchmark.stats import spread, timed

__all__ = ["Measured", "spread", "timed", "run_cmd", "alternate", "alternate_timed", "count",
           "table"]


@dataclass
class Measured:
    name: str
    unit: str  # what `rate` counts per second, e.g. "MB/s", "files/s", "actions/s"
    stoker: list[float]
    reference: list[float]
    reference_name: str
    target: float  # minimum acceptable ratio
    note: str = ""
    # For a target that is not a ratio (e.g. "overhead p50 <= 2 ms"): its text, and whether
    # it was met, which then decides the `met` column instead of the ratio.
    criterion: str = ""
    passed: bool | None = None

    @property
    def ratio(self) -> float:
        return statistics.median(self.stoker) / statistics.median(self.reference)

    @property
    def met(self) -> bool:
        if self.passed is not None:
            return self.passed
        return self.ratio >= self.target


def run_cmd(argv: list[str], **kw) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)


def alternate(repeats: int, work: float, stoker: Callable[[], object],
              reference: Callable[[], object]) -> tuple[list[float], list[float]]:
    """Rates (work per second) of both, measured alternately `repeats` times each."""
    return alternate_timed(repeats, work, lambda: timed(stoker), lambda: timed(reference))


def alternate_timed(repeats: int, work: float, stoker: Callable[[], float],
                    reference: Callable[[], float]) -> tuple[list[float], list[float]]:
    """Like alternate(), for callables that time themselves (set-up and clean-up outside the
    timed part) and return seconds."""
    s_rates, r_rates = [], []
    for _ in range(repeats):
        r_rates.append(work / reference())
        s_rates.append(work / stoker())
    return s_rates, r_rates


def count(n: int) -> str:
    """100000 -> '100k', 1500 -> '1,500': how the issue's table names data set sizes."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"{n:,}"


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def table(results: list[Measured]) -> str:
    head = ("| benchmark | unit | Stoker (median ± spread) | reference | reference (median ± "
            "spread) | ratio | target | met |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for m in results:
        target = m.criterion or f">= {m.target:g}"
        rows.append(
            f"| {m.name} | {m.unit} | {_num(statistics.median(m.stoker))} ± "
            f"{spread(m.stoker):.0%} | {m.reference_name} | "
            f"{_num(statistics.median(m.reference))} ± {spread(m.reference):.0%} "
            f"| {m.ratio:.2f} | {target} | {'yes' if m.met else '**NO**'} |")
    notes = [f"- {m.name}: {m.note}" for m in results if m.note]
    return "\n".join([head, *rows, *(["", *notes] if notes else [])])
