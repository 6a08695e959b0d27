"""Per-action memory limits and CPU weights through cgroups, below the worker's own cgroup (so
a pod's limits still hold over them): cgroup v1's memory controller (this machine), or v2 where the
worker's cgroup already delegates it. One cgroup per slot uid, reused by its next action; the
spawn helper joins it before the command starts. Processes are bounded by RLIMIT_NPROC
instead (each slot uid is one action's alone), which needs no cgroup and costs nothing.

CPU weight follows the action's EstimatedCPU (cpu.shares, 1024 a core, in v1's cpu
controller; cpu.weight in v2 where it is delegated): an action that declares none stays in
the worker's own CPU cgroup, sharing with the others as before.

Where no memory cgroup is writable (a container without a writable cgroupfs), /statusz says
so and memory is bounded only by the OOM killer's choice (actions +1000, Stoker lower)."""

from __future__ import annotations

import os

from engine.resources import estimate, machine_memory_bytes
from engine.runners.protocol import Platform

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


def cpu_shares(platform: Platform) -> int | None:
    """The CPU weight from an action's EstimatedCPU, 1024 a core (as cgroup v1 and Docker
    count), or None where it declares none."""
    size = estimate(list(platform), "platform.properties")
    if size is None:
        return None
    return max(2, size.milli_cpu * 1024 // 1000)


class ActionCgroups:
    """Cgroups for the actions of one worker, named after it (`stoker-<name>/<uid>`)."""

    def __init__(self, name: str):
        self.name = name
        self.memory_base: str | None = None
        self.cpu_base: str | None = None  # where CPU weights can be set (may be memory_base)
        self.v2 = False
        self._shares: dict[str, int] = {}  # what each CPU cgroup's weight is now
        self._limits: dict[str, int] = {}  # what each cgroup's memory limit is now
        self._oom_kills: dict[int, int] = {}  # each uid's kernel OOM-kill count, last seen
        self._detect()

    @property
    def mechanism(self) -> str:
        if self.memory_base is None:
            return "none"
        return "memory cgroup " + ("v2" if self.v2 else "v1")

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
        self.cpu_base = self._try_base(os.path.join(ROOT, "cpu"), _own_path("cpu"))
        if self.memory_base is None:
            own = _own_path("")
            try:
                with open(os.path.join(ROOT, (own or "/").lstrip("/"),
                                       "cgroup.subtree_control")) as f:
                    delegated = f.read().split()
            except OSError:
                return
            if "memory" in delegated:
                base = self._try_base(ROOT, own)
                if base is not None:
                    try:
                        _write(os.path.join(base, "cgroup.subtree_control"), "+memory")
                    except OSError:
                        return
                    self.v2 = True
                    self.memory_base = base
                    if "cpu" in delegated:
                        try:
                            _write(os.path.join(base, "cgroup.subtree_control"), "+cpu")
                            self.cpu_base = base
                        except OSError:
                            pass

    def prepare(self, uid: int, memory_bytes: int, cpu_shares: int | None = None) -> list[str]:
        """The cgroup.procs files the action's helper joins, its limit and weight set.
        Memory: none where none is needed (no limit below the machine's memory: the OOM
        killer takes actions first anyway) or no memory cgroup is writable; CPU: where the
        action declares a weight and a CPU cgroup is writable. Written only when changed.
        (Processes are bounded by RLIMIT_NPROC: each slot uid is one action's alone.)"""
        limited = self.memory_base is not None and 0 < memory_bytes < machine_memory_bytes()
        if self.cpu_base is not None and self.cpu_base == self.memory_base:
            # v2, one cgroup for both: whatever this action declares, the other value is
            # set back to its default, so nothing of the slot's previous action holds.
            if not limited and cpu_shares is None:
                return []
            procs = self._prepare_cpu(uid, cpu_shares if cpu_shares is not None else 1024)
            self._set_memory_of(uid, memory_bytes if limited else 0)
            if not limited:
                self._oom_kills.pop(uid, None)  # no limit of its own to be killed for
            return procs
        procs = self._prepare_cpu(uid, cpu_shares)
        if not limited:
            return procs
        return [*procs, self._set_memory_of(uid, memory_bytes)]

    def _prepare_cpu(self, uid: int, cpu_shares: int | None) -> list[str]:
        if self.cpu_base is None or cpu_shares is None:
            return []
        d = os.path.join(self.cpu_base, str(uid))
        if self._shares.get(d) != cpu_shares:
            os.makedirs(d, exist_ok=True)
            if self.v2 and self.cpu_base == self.memory_base:
                # v2's weight: 1..10000, 100 the default (a core's worth, as 1024 in v1).
                weight = min(10000, max(1, cpu_shares * 100 // 1024))
                _write(os.path.join(d, "cpu.weight"), str(weight))
            else:
                _write(os.path.join(d, "cpu.shares"), str(cpu_shares))
            self._shares[d] = cpu_shares
        return [os.path.join(d, "cgroup.procs")]

    def _set_memory_of(self, uid: int, memory_bytes: int) -> str:
        assert self.memory_base is not None
        d = os.path.join(self.memory_base, str(uid))
        if self._limits.get(d) != memory_bytes:
            os.makedirs(d, exist_ok=True)
            self._set_memory(d, memory_bytes)
            self._limits[d] = memory_bytes
        # Each time: a previous action that ended abnormally did not read its count.
        self._oom_kills[uid] = _oom_kills(d, self.v2)
        return os.path.join(d, "cgroup.procs")

    def _set_memory(self, d: str, memory_bytes: int) -> None:
        if self.v2:
            _write(os.path.join(d, "memory.max"), str(memory_bytes or "max"))
            _write(os.path.join(d, "memory.swap.max"), "0")
            return
        limit = str(memory_bytes or -1)
        # memory + swap too, so swap is no way around the limit. The kernel refuses a memory
        # limit above the memsw one: lift memsw first, then set both.
        swap = os.path.join(d, "memory.memsw.limit_in_bytes")
        has_swap = os.path.exists(swap)
        if has_swap:
            _write(swap, "-1")
        _write(os.path.join(d, "memory.limit_in_bytes"), limit)
        if has_swap:
            _write(swap, limit)

    def remove(self) -> None:
        """Remove this worker's (empty) cgroups: on the way out, and in tests."""
        for base in {b for b in (self.memory_base, self.cpu_base) if b}:
            try:
                for entry in os.scandir(base):
                    if entry.is_dir(follow_symlinks=False):
                        os.rmdir(entry.path)
                os.rmdir(base)
            except OSError:
                pass  # still in use, or gone: the next worker of this name reuses it

    def oom_killed(self, uid: int) -> bool:
        """Whether the OOM killer killed in uid's cgroup since prepare() joined it (the
        kernel's count only grows)."""
        if self.memory_base is None or uid not in self._oom_kills:
            return False  # not in a memory cgroup (a CPU weight only)
        kills = _oom_kills(os.path.join(self.memory_base, str(uid)), self.v2)
        before = self._oom_kills.get(uid, kills)
        self._oom_kills[uid] = kills
        return kills > before
