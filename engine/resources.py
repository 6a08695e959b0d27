"""What an action is expected to need (its TaskSize) and what this machine can give.

Actions are admitted by estimate, as BuildBuddy's executors do: the platform properties
EstimatedCPU and EstimatedMemory when the client sets them. An action that sets neither is
taken to need one slot's share of its worker (the worker's CPU and memory over its
num_concurrent_actions share), so a machine runs that many such actions at once. The
scheduler sums the estimates of what runs on a worker and starts an action only when it fits
beside them; an action bigger than a whole worker is cut down to the worker's size (so it
runs alone rather than never). Estimates are not limits: nothing here caps what a running
action really uses.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from engine.errors import InvalidArgument

# BuildBuddy's minimums (a declared estimate below them is raised to them).
MIN_MILLI_CPU = 250
MIN_MEMORY_BYTES = 6_000_000

CPU_PROPERTY = "EstimatedCPU"
MEMORY_PROPERTY = "EstimatedMemory"

_MEMORY_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class TaskSize:
    milli_cpu: int
    memory_bytes: int

    def clamped(self, milli_cpu: int, memory_bytes: int) -> TaskSize:
        """At most the given totals (0 means unlimited)."""
        return TaskSize(min(self.milli_cpu, milli_cpu) if milli_cpu else self.milli_cpu,
                        min(self.memory_bytes, memory_bytes) if memory_bytes
                        else self.memory_bytes)



def parse_cpu(text: str, field: str) -> int:
    """'2' or '1.5' cores, or '1500m' millicores → millicores."""
    t = text.strip()
    try:
        value = float(t[:-1]) if t.endswith("m") else float(t) * 1000
    except ValueError:
        raise InvalidArgument(f"{field}: {text!r} is not a CPU amount like 2, 1.5 or "
                              "1500m") from None
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{field}: {text!r} must be a non-negative CPU amount")
    return int(value)


def parse_memory(text: str, field: str) -> int:
    """'4GB', '512MiB', '1e9' or a byte count → bytes."""
    m = re.fullmatch(r"([0-9.]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)", text.strip())
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _MEMORY_UNITS:
        raise InvalidArgument(f"{field}: {text!r} is not a memory amount like 4GB, 512MiB "
                              "or 1e9")
    try:
        value = float(m.group(1)) * _MEMORY_UNITS[unit]
    except ValueError:
        raise InvalidArgument(f"{field}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise InvalidArgument(f"{field}: {text!r} is too large")
    return int(value)


def estimate(properties: list[tuple[str, str]], where: str) -> TaskSize | None:
    """The size an action asks for through its platform properties (names compared without
    case, as BuildBuddy does), at least the minimums; None when it declares neither."""
    cpu = memory = None
    for name, value in properties:
        key = name.lower()
        if key == CPU_PROPERTY.lower():
            cpu = parse_cpu(value, f"{where}.{name}")
        elif key == MEMORY_PROPERTY.lower():
            memory = parse_memory(value, f"{where}.{name}")
    if cpu is None and memory is None:
        return None
    return TaskSize(max(cpu or 0, MIN_MILLI_CPU), max(memory or 0, MIN_MEMORY_BYTES))


def machine_milli_cpu() -> int:
    return 1000 * len(os.sched_getaffinity(0))


def machine_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def share(total: int, parts: int, index: int) -> int:
    """Part `index` of `total` split into `parts` nearly equal whole shares."""
    base, extra = divmod(total, parts)
    return base + (1 if index < extra else 0)
