"""Per-action memory limits through cgroups, below the worker's own cgroup (so a pod's limits
still hold over them): cgroup v1's memory controller (this machine), or v2 where the
worker's cgroup already delegates it. One cgroup per slot uid, reused by its next action; the
spawn helper joins it before the command starts. Processes are bounded by RLIMIT_NPROC
instead (each slot uid is one action's alone), which needs no cgroup and costs nothing.

Where no memory cgroup is writable (a container without a writable cgroupfs), /statusz says
so and memory is bounded only by the OOM killer's choice (actions +1000, Stoker lower)."""

from __future__ import annotations

import os

from engine.resources import machine_memory_bytes

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


class ActionCgroups:
    """Cgroups for the actions of one worker, named after it (`stoker-<name>/<uid>`)."""

    def __init__(self, name: str):
        self.name = name
        self.memory_base: str | None = None
        self.v2 = False
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

    def prepare(self, uid: int, memory_bytes: int) -> list[str]:
        """The cgroup.procs files the action's helper joins, its limit set; [] where none is
        needed: no limit below the machine's memory (the OOM killer takes actions first
        anyway), or no writable memory cgroup. Limits are written only when they change.
        (Processes are bounded by RLIMIT_NPROC: each slot uid is one action's alone.)"""
        if self.memory_base is None or not 0 < memory_bytes < machine_memory_bytes():
            return []
        d = os.path.join(self.memory_base, str(uid))
        if self._limits.get(d) != memory_bytes:
            os.makedirs(d, exist_ok=True)
            self._set_memory(d, memory_bytes)
            self._limits[d] = memory_bytes
        # Each time: a previous action that ended abnormally did not read its count.
        self._oom_kills[uid] = _oom_kills(d, self.v2)
        return [os.path.join(d, "cgroup.procs")]

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
        for base in [self.memory_base] if self.memory_base else []:
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
        assert self.memory_base is not None
        kills = _oom_kills(os.path.join(self.memory_base, str(uid)), self.v2)
        before = self._oom_kills.get(uid, kills)
        self._oom_kills[uid] = kills
        return kills > before
