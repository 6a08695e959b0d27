"""How busy the machine was with work other than ours while something was measured.

A benchmark on a shared machine (other users, other services, or a noisy VM host) reads
low without saying why; this puts a number on it. Busy CPU time comes from /proc/stat,
ours from getrusage (this process and the children it waited for), and steal is the time
the hypervisor gave our virtual CPUs to someone else.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_stat() -> tuple[float, float]:
    """(busy, steal) seconds of all CPUs since boot."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


def _ours() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


@dataclass
class OtherLoad:
    others: float  # cores kept busy by other work, on average
    steal: float  # cores taken by the hypervisor, on average

    def __str__(self) -> str:
        return f"other work {self.others:.2f} cores, steal {self.steal:.2f} cores"

    @property
    def noisy(self) -> bool:
        return self.others + self.steal >= 0.25


class LoadMeter:
    """Started on creation; stop() gives the load others put on the machine meanwhile.
    Kernel threads working for us (writeback of our files) count as others: a floor."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._busy0, self._steal0 = _proc_stat()
        self._ours0 = _ours()

    def stop(self) -> OtherLoad:
        wall = max(time.monotonic() - self._t0, 1e-9)
        busy, steal = _proc_stat()
        others = (busy - self._busy0) - (_ours() - self._ours0)
        return OtherLoad(max(0.0, others / wall), max(0.0, (steal - self._steal0) / wall))
