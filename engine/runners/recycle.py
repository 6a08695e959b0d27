"""Kept containers for actions that opt in with `recycle-runner=true` (BuildBuddy's platform
property): the first such action starts a container that only holds (the spawn helper's
--hold as its pid 1), this and later actions with the same key run in it one at a time
(--reap-all), and it is thrown away unless it is as clean after an action as it was made.

What makes reuse safe (the container runners make it so; tests/pipeline/test_recycled_*):
- The key is BuildBuddy's (pool.take in its runner.go: group, instance name, the whole
  Platform; the group from the task's JWT where the scheduler gives one) plus what Stoker
  binds: the slot uid (so a container is never shared across uids), the exact exec root
  and TMPDIR directories (by inode: they are bound when the container starts, and emptied
  in place between actions), the image and the limits.
- The container's root filesystem is read-only; the exec root and TMPDIR (bound at /tmp and
  /var/tmp) are the only writable places besides /dev/shm and /dev/mqueue, which must be
  empty afterwards, as must System V IPC.
- After the command, every other process in the container but its pid 1 is killed; then
  the host reads the container's cgroup: anything but pid 1 left, leftovers the helper
  reports, no report at all (the command may kill the helper), a timeout, a cancel or any
  doubt and the container is removed.
- Idle containers go after IDLE_S, the least recently used beyond MAX_IDLE, and all of them
  when the worker stops; a killed worker's are removed by its successor by name.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from engine.platform import value_of
from engine.runners.protocol import Limits, Platform, RunRequest

RECYCLE_PROPERTY = "recycle-runner"
MAX_IDLE = 8  # kept containers per worker process
IDLE_S = 600.0
# What the helper checks after each action in a kept container (its writable places that
# Stoker does not empty itself).
CLEAN_CHECKS = ("--check-empty", "/dev/shm", "--check-empty", "/dev/mqueue", "--check-ipc")


def after_action(status: str) -> tuple[int | None, bool]:
    """What the spawn helper's --reap-all said after the command: the last line of its
    status (its own, written last; the command cannot reach its fds), the command's exit
    code (None: it said nothing, it died) and whether the container looked as clean as it
    was made from inside. Callers also look from the host (only_holder_left)."""
    if "\n" not in status:
        return None, False
    last = status.rpartition("\n")[2]
    if last[:1] not in ("C", "D"):
        return None, False
    code = last[1:].partition(" ")[0]
    if not code.isdigit():
        return None, False
    return int(code), last[0] == "C"


def procs_file(pid: int) -> str | None:
    """The cgroup.procs of pid's cgroup (cgroup v1's pids controller, else v2), where every
    process of a container is, whatever it did inside: None where it cannot be told."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    v2 = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return f"/sys/fs/cgroup/pids{path}/cgroup.procs"
        if controllers == "":
            v2 = f"/sys/fs/cgroup{path}/cgroup.procs"
    return v2


def only_holder_left(procs: str | None, holder: int) -> bool:
    """Whether the container's cgroup holds its pid 1 (the holder) and nothing else: the
    host's view, which no process inside can forge."""
    if procs is None:
        return False
    try:
        with open(procs) as f:
            pids = {int(p) for p in f.read().split()}
    except (OSError, ValueError):
        return False
    return pids == {holder}


def requested(platform: Platform) -> bool:
    """Whether the action opts in (BuildBuddy reads the value as a boolean)."""
    return (value_of(platform, RECYCLE_PROPERTY) or "").strip().lower() == "true"


@dataclass(frozen=True)
class WarmKey:
    image: str
    tenant: str  # whose builds (BuildBuddy: the group of the task's JWT); "" where unknown
    run_as: tuple[int, int]
    exec_root: tuple[str, int, int]  # path, st_dev, st_ino
    tmpdir: tuple[str, int, int]
    instance_name: str
    platform: Platform
    limits: Limits


def key_of(req: RunRequest, image: str) -> WarmKey:
    assert req.run_as is not None
    return WarmKey(image, req.tenant, req.run_as, _identity(req.exec_root),
                   _identity(req.tmpdir), req.instance_name, req.platform, req.limits)


def _identity(path: str) -> tuple[str, int, int]:
    st = os.stat(path, follow_symlinks=False)
    return path, st.st_dev, st.st_ino


class WarmContainers:
    """The idle kept containers of one runner, by key, least recently used first. Only idle
    ones are here: take() hands one out for a single action."""

    def __init__(self, max_idle: int = MAX_IDLE, idle_s: float = IDLE_S):
        self.max_idle = max_idle
        self.idle_s = idle_s
        self._idle: OrderedDict[str, tuple[WarmKey, float]] = OrderedDict()

    def take(self, key: WarmKey) -> str | None:
        for name, (k, _) in reversed(self._idle.items()):
            if k == key:
                del self._idle[name]
                return name
        return None

    def give_back(self, key: WarmKey, name: str) -> list[str]:
        """Keep name for the next action with key; returns the containers to remove now
        (expired, or beyond max_idle)."""
        self._idle[name] = (key, time.monotonic())
        return self.expired()

    def expired(self) -> list[str]:
        now = time.monotonic()
        gone = [n for n, (_, since) in self._idle.items() if now - since > self.idle_s]
        while len(self._idle) - len(gone) > self.max_idle:
            gone.append(next(n for n in self._idle if n not in gone))
        for n in gone:
            del self._idle[n]
        return gone

    def drain(self) -> list[str]:
        names = list(self._idle)
        self._idle.clear()
        return names

    def __len__(self) -> int:
        return len(self._idle)


class KeptContainers:
    """The kept containers of one container runner: the idle ones by key (WarmContainers),
    the holder of each (pid 1, by its host pid, and the cgroup.procs to check it by) and the
    removals under way. remove(names) removes containers through the runner's engine."""

    def __init__(self, remove: Callable[[list[str]], Awaitable[None]]):
        self.warm = WarmContainers()
        self._remove = remove
        self._holders: dict[str, tuple[int, str | None]] = {}
        self._removals: set[asyncio.Task] = set()

    def take(self, key: WarmKey) -> str | None:
        return self.warm.take(key)

    def started(self, name: str, holder: int) -> None:
        self._holders[name] = (holder, procs_file(holder))

    def only_holder_left(self, name: str) -> bool:
        holder, procs = self._holders.get(name, (0, None))
        return only_holder_left(procs, holder)

    async def after(self, key: WarmKey, name: str, clean: bool) -> None:
        """After an action in name: kept for the next one with key if clean (those that
        expire meanwhile are removed in the background), else removed now."""
        if not clean:
            await asyncio.shield(self.remove([name]))
            return
        gone = self.warm.give_back(key, name)
        if gone:
            task = asyncio.get_running_loop().create_task(self.remove(gone))
            self._removals.add(task)
            task.add_done_callback(self._removals.discard)

    def forget(self, name: str) -> None:
        """name is being removed by other means."""
        self._holders.pop(name, None)

    async def remove(self, names: list[str]) -> None:
        for name in names:
            self.forget(name)
        await self._remove(names)

    async def close(self) -> None:
        """Remove every kept container (the worker stops)."""
        names = self.warm.drain()
        if names:
            await self.remove(names)
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
