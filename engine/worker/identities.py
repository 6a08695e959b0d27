"""Who an action runs as.

When Stoker runs as root (run_as: auto), every action runs as a uid of its own taken from the
worker's share of action_uids (each uid is also its gid), held from staging until its
directory is emptied: concurrent actions cannot reach each other's files or processes, a
later action cannot reach an earlier one's directory while its outputs are collected, and a
uid's processes are exactly one action's (what the uid sweep relies on). None of these uids
owns anything in the data directory.

Otherwise every action runs as one user: Stoker's own (run_as: self, or auto when Stoker is
not root) or the one run_as names.
"""

from __future__ import annotations

import asyncio
import os
import pwd

from engine.config import Config, ConfigError

RunAs = tuple[int, int]


class Identities:
    """Hands out the identity of each action; asyncio, on the worker's loop."""

    def __init__(self, separate: list[RunAs] | None = None, shared: RunAs | None = None):
        self.separate = separate is not None  # one uid per action at a time
        self.shared = shared  # the one identity of every action (None: Stoker's own)
        self._all = list(separate or [])
        self._free: asyncio.Queue[RunAs] | None = None

    @property
    def uids(self) -> list[int]:
        return [uid for uid, _ in self._all]

    async def acquire(self) -> RunAs | None:
        if not self.separate:
            return self.shared
        if self._free is None:
            self._free = asyncio.Queue()
            for ident in self._all:
                self._free.put_nowait(ident)
        # Waits only when every uid's directory is still being emptied.
        return await self._free.get()

    def release(self, ident: RunAs | None) -> None:
        if self.separate and ident is not None and self._free is not None:
            self._free.put_nowait(ident)


def lookup_user(setting: str) -> RunAs:
    try:
        entry = pwd.getpwuid(int(setting)) if setting.isdigit() else pwd.getpwnam(setting)
    except (KeyError, ValueError):
        raise ConfigError(f"run_as: no such user {setting!r}") from None
    return entry.pw_uid, entry.pw_gid


def for_worker(config: Config, slot: int) -> Identities:
    """The identities of worker `slot`'s actions under config.run_as."""
    setting = config.run_as
    if setting == "auto":
        if os.geteuid() != 0:
            return Identities()
        return Identities(separate=[(uid, uid) for uid in config.slot_uids(slot)])
    if setting in ("", "self"):
        return Identities()
    return Identities(shared=lookup_user(setting))


def sample(config: Config) -> RunAs | None:
    """One identity actions will run as (for start-up checks), None for Stoker's own."""
    ids = for_worker(config, 0)
    if ids.separate:
        return ids._all[0]
    return ids.shared
