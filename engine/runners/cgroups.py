"""Per-action memory and pids limits through cgroups, below the worker's own cgroup (so a pod's
limits still hold over them): cgroup v1's memory and pids controllers (this machine), or v2
where the worker's cgroup already delegates those controllers. One cgroup per slot uid,
reused by its next action; the spawn helper joins it before the command starts.

Where neither is writable (a container without a writable cgroupfs), /statusz says so and
the per-uid RLIMIT_NPROC still bounds processes; memory is then bounded only by the OOM
killer's choice (actions +1000, Stoker strongly negative)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

ROOT = "/sys/fs/cgroup"


def _own_path(controller: str) -> str | None:
    """This process's cgroup in a v1 hierarchy (controller) or v2 (''), from /proc."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
        if not controller and controllers == "":
            return path
    return None


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _oom_kills(directory: str, v2: bool) -> int:
    name = "memory.events" if v2 else "memory.oom_control"
    try:
        with open(os.path.join(directory, name)) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def pids_ceiling() -> int | None:
    """The smallest pids.max over this process's pids cgroup and its ancestors (a pod's pid
    limit), or None where there is none."""
    own = _own_path("pids")
    hierarchy = os.path.join(ROOT, "pids")
    if own is None:
        own, hierarchy = _own_path(""), ROOT
        if own is None:
            return None
    ceiling = None
    path = own
    while True:
        try:
            with open(os.path.join(hierarchy, path.lstrip("/"), "pids.max")) as f:
                text = f.read().strip()
            if text != "max":
                ceiling = int(text) if ceiling is None else min(ceiling, int(text))
        except (OSError, ValueError):
            pass
        if path in ("/", ""):
            return ceiling
        path = os.path.dirname(path)


@dataclass
class Usage:
    oom_killed: bool
    peak_memory_bytes: int


class ActionCgroups:
    """Cgroups for the actions of one worker, named after it (`stoker-<name>/<uid>`)."""

    def __init__(self, name: str):
        self.name = name
        self.memory_base: str | None = None
        self.pids_base: str | None = None
        self.v2 = False
        self._baseline: dict[int, int] = {}
        self._detect()

    @property
    def mechanism(self) -> str:
        kinds = [k for k, base in (("memory", self.memory_base), ("pids", self.pids_base))
                 if base is not None]
        if not kinds:
            return "none"
        return ("cgroup-v2 " if self.v2 else "cgroup-v1 ") + "+".join(kinds)

    def _try_base(self, hierarchy: str, own: str | None) -> str | None:
        if own is None or not os.path.isdir(hierarchy):
            return None
        base = os.path.join(hierarchy, own.lstrip("/"), f"stoker-{self.name}")
        try:
            os.makedirs(base, exist_ok=True)
        except OSError:
            return None
        return base

    def _detect(self) -> None:
        if os.geteuid() != 0:
            return
        self.memory_base = self._try_base(os.path.join(ROOT, "memory"), _own_path("memory"))
        self.pids_base = self._try_base(os.path.join(ROOT, "pids"), _own_path("pids"))
        if self.memory_base is None and self.pids_base is None:
            own = _own_path("")
            try:
                with open(os.path.join(ROOT, (own or "/").lstrip("/"),
                                       "cgroup.subtree_control")) as f:
                    delegated = f.read().split()
            except OSError:
                return
            if "memory" in delegated and "pids" in delegated:
                base = self._try_base(ROOT, own)
                if base is not None:
                    self.v2 = True
                    try:
                        _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids")
                    except OSError:
                        return
                    self.memory_base = self.pids_base = base

    def prepare(self, uid: int, memory_bytes: int, pids: int) -> list[str]:
        """The cgroup.procs files the action's helper joins, limits set; [] where none."""
        procs: list[str] = []
        if self.memory_base is not None:
            d = os.path.join(self.memory_base, str(uid))
            os.makedirs(d, exist_ok=True)
            if self.v2:
                _write(os.path.join(d, "memory.max"), str(memory_bytes or "max"))
                _write(os.path.join(d, "memory.swap.max"), "0")
            else:
                limit = str(memory_bytes or -1)
                # memory + swap too, so swap is no way around the limit. The kernel refuses a
                # memory limit above the memsw one: lift memsw first, then set both.
                swap = os.path.join(d, "memory.memsw.limit_in_bytes")
                has_swap = os.path.exists(swap)
                if has_swap:
                    _write(swap, "-1")
                _write(os.path.join(d, "memory.limit_in_bytes"), limit)
                if has_swap:
                    _write(swap, limit)
                try:
                    _write(os.path.join(d, "memory.max_usage_in_bytes"), "0")
                except OSError:
                    pass
            self._baseline[uid] = _oom_kills(d, self.v2)
            procs.append(os.path.join(d, "cgroup.procs"))
        if self.pids_base is not None:
            d = os.path.join(self.pids_base, str(uid))
            os.makedirs(d, exist_ok=True)
            _write(os.path.join(d, "pids.max"), str(pids or "max"))
            if not self.v2 or d not in [os.path.dirname(p) for p in procs]:
                procs.append(os.path.join(d, "cgroup.procs"))
        return procs

    def remove(self) -> None:
        """Remove this worker's (empty) cgroups: on the way out, and in tests."""
        for base in {self.memory_base, self.pids_base} - {None}:
            assert base is not None
            try:
                for entry in os.scandir(base):
                    if entry.is_dir(follow_symlinks=False):
                        os.rmdir(entry.path)
                os.rmdir(base)
            except OSError:
                pass  # still in use, or gone: the next worker of this name reuses it

    def usage(self, uid: int) -> Usage:
        """What the last action of uid used, and whether the OOM killer killed in it."""
        if self.memory_base is None:
            return Usage(False, 0)
        d = os.path.join(self.memory_base, str(uid))
        kills = _oom_kills(d, self.v2) - self._baseline.get(uid, 0)
        peak = _read_int(os.path.join(d, "memory.peak" if self.v2 else
                                      "memory.max_usage_in_bytes"))
        return Usage(kills > 0, peak)
