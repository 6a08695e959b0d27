"""Who an action runs as.

When Stoker runs as root (run_as: auto), every action runs as a uid of its own taken from the
uids of action_uids its worker claimed (each uid is also its gid), held from staging until its
directory is emptied: concurrent actions cannot reach each other's files or processes, a
later action cannot reach an earlier one's directory while its outputs are collected, and a
uid's processes are exactly one action's (what the uid sweep relies on). None of these uids
owns anything in the data directory.

A worker claims its uids machine-wide, with a flock on /run/stoker-uids/<uid> held for its
life, so several Stokers on one machine (other data directories, test suites) never share a
uid: sharing one would let their actions reach each other, and a worker's sweep of its uids
at start would kill the other's actions.

Otherwise every action runs as one user: Stoker's own (run_as: self, or auto when Stoker is
not root) or the one run_as names.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pwd
import stat

from engine.config import Config, ConfigError

RunAs = tuple[int, int]


class Identities:
    """Hands out the identity of each action; asyncio, on the worker's loop."""

    def __init__(self, separate: list[RunAs] | None = None, shared: RunAs | None = None):
        self.separate = separate is not None  # one uid per action at a time
        self.shared = shared  # the one identity of every action (None: Stoker's own)
        self._all = list(separate or [])
        self._free: asyncio.Queue[RunAs] | None = None
        self.lock_fds: list[int] = []  # the claims on separate's uids (see claim())

    @property
    def uids(self) -> list[int]:
        return [uid for uid, _ in self._all]

    def one(self) -> RunAs | None:
        """An identity actions run as (for checks before any runs), None for Stoker's own."""
        return self._all[0] if self.separate else self.shared

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


# Where uid claims live: machine-wide where /run allows (a root-only tmpfs on most systems),
# else in the data directory (a container's /run may be read-only; its uids are its own).
UID_LOCK_DIR = "/run/stoker-uids"


def _lock_dir(config: Config) -> str:
    for path in (UID_LOCK_DIR, os.path.join(config.run_dir, "uids")):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            continue
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077:
            return path
    raise ConfigError(f"action_uids: no private directory to claim uids in ({UID_LOCK_DIR} "
                      f"nor {config.run_dir}/uids is usable)")


def claim(config: Config, slot: int) -> Identities:
    """Worker `slot`'s identities: as many uids of action_uids as it needs that no other
    worker on this machine holds, starting at its own share of the range."""
    first, last = config.action_uid_range()
    need = config.uids_per_worker(slot)
    start = config.slot_uids(slot)[0]
    directory = _lock_dir(config)
    uids: list[int] = []
    fds: list[int] = []
    span = last - first + 1
    for i in range(span):
        uid = first + (start - first + i) % span
        fd = os.open(os.path.join(directory, str(uid)),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        uids.append(uid)
        fds.append(fd)
        if len(uids) == need:
            break
    else:
        for fd in fds:
            os.close(fd)
        raise ConfigError(f"action_uids: {config.action_uids} has fewer than {need} uids left "
                          "that no other Stoker on this machine holds; give each Stoker a "
                          "range of its own")
    ids = Identities(separate=[(uid, uid) for uid in uids])
    ids.lock_fds = fds
    return ids


def sample(config: Config) -> RunAs | None:
    """One identity actions will run as (for start-up checks), None for Stoker's own."""
    return for_worker(config, 0).one()
