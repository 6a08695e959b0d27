"""Summaries of repeated measurements: median, a plain spread figure, percentiles."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> float:
    """Half the min-max range as a fraction of the median: a plain, honest noise figure."""
    m = statistics.median(values)
    return (max(values) - min(values)) / 2 / m if m else 0.0


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank p-th percentile (0 < p <= 100)."""
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def timed(fn: Callable[[], object]) -> float:
    """Seconds fn takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
