"""Shared machinery for bench/: repeat, take the median and spread, and print ratios.

Every benchmark measures Stoker and its reference in the same run, alternating them so both
see the same machine state, and reports ratio = Stoker's rate / the reference's rate
(>= 1.0 means Stoker is at least as fast).
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Measured:
    name: str
    unit: str  # what `rate` counts per second, e.g. "MB/s", "files/s", "actions/s"
    stoker: list[float]
    reference: list[float]
    reference_name: str
    target: float  # minimum acceptable ratio
    note: str = ""

    @property
    def ratio(self) -> float:
        return statistics.median(self.stoker) / statistics.median(self.reference)

    @property
    def met(self) -> bool:
        return self.ratio >= self.target


def spread(values: list[float]) -> float:
    """Half the min-max range as a fraction of the median: a plain, honest noise figure."""
    m = statistics.median(values)
    return (max(values) - min(values)) / 2 / m if m else 0.0


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_cmd(argv: list[str], **kw) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)


def alternate(repeats: int, work: float, stoker: Callable[[], object],
              reference: Callable[[], object]) -> tuple[list[float], list[float]]:
    """Rates (work per second) of both, measured alternately `repeats` times each."""
    s_rates, r_rates = [], []
    for _ in range(repeats):
        r_rates.append(work / timed(reference))
        s_rates.append(work / timed(stoker))
    return s_rates, r_rates


def table(results: list[Measured]) -> str:
    head = ("| benchmark | unit | Stoker (median ± spread) | reference | reference (median) "
            "| ratio | target | met |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for m in results:
        rows.append(
            f"| {m.name} | {m.unit} | {statistics.median(m.stoker):,.1f} ± {spread(m.stoker):.0%} "
            f"| {m.reference_name} | {statistics.median(m.reference):,.1f} | {m.ratio:.2f} "
            f"| >= {m.target:g} | {'yes' if m.met else 'NO'} |")
    notes = [f"- {m.name}: {m.note}" for m in results if m.note]
    return "\n".join([head, *rows, *(["", *notes] if notes else [])])
