"""The data directory: one Stoker at a time, and nothing in it open to actions.

One Stoker per data directory: the supervisor takes an exclusive flock on <data>/stoker.lock
(0600) and writes its pid there. Its children inherit the open file (supervisor.py passes
the fd), and a flock belongs to the open file, not to a process: it is held until the last
of them exits. A supervisor killed with SIGKILL leaves children that are still draining
(they get SIGTERM through PR_SET_PDEATHSIG, engine/lifeline.py) and a new start is refused
until they are gone. Actions never inherit the fd: the runner spawns with close_fds=True.

Modes: when Stoker runs as root, actions run as other uids and must not list, open or lock
anything here. <data> is 0711 (searchable, so they reach their exec roots under build/,
whose modes engine/pipeline/build_dir.py sets), everything else Stoker keeps
here is 0700, and lock files are 0600 whoever runs Stoker (a shared lock on the CAS lock
file would freeze every CAS write). Fixed at every start, so a data directory made by an
older version is tightened too. Below the private directories nothing needs changing: a
0700 directory cannot be passed through.
"""

from __future__ import annotations

import errno
import fcntl
import os

from engine.config import Config, ConfigError
from engine.pids import pid_alive

LOCK_NAME = "stoker.lock"
# Tells a child which inherited fd is the lock, so it can close it on exec: a process it
# spawned without close_fds would otherwise hold the lock too, and could unlock it.
LOCK_FD_ENV = "STOKER_LOCK_FD"


def keep_lock_from_children() -> None:
    """In a child of the supervisor: the inherited lock fd is not passed on further."""
    fd = os.environ.get(LOCK_FD_ENV, "")
    if fd.isdigit():
        try:
            os.set_inheritable(int(fd), False)
        except OSError:
            pass
# Directories only Stoker's own processes use (the build directory is not among them).
PRIVATE_DIRS = ("ac", "uploads", "run")
CACHE_PRIVATE_DIRS = ("cas", "tmp")


class DataDirInUse(ConfigError):
    """Another Stoker (or the children of a killed one) holds the data directory."""


def lock(data_dir: str) -> int:
    """Take <data_dir>/stoker.lock for this process and its children; the fd (O_CLOEXEC:
    pass it to children explicitly). Raises DataDirInUse naming the pid that holds it."""
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataDirInUse(_in_use_message(data_dir, path, fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _in_use_message(data_dir: str, path: str, fd: int) -> str:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    pid = int(text) if text.isdigit() else None
    holders = [p for p in _holders(os.fstat(fd)) if p != os.getpid()]
    if pid is not None and pid_alive(pid):
        who = f"Stoker pid {pid}"
    elif pid is not None:
        # The supervisor was killed; its children drain (within drain_grace) and then exit.
        left = ", ".join(map(str, holders)) or "unknown"
        who = f"the children (pids {left}) of Stoker pid {pid}, which is gone"
    else:
        who = f"pids {', '.join(map(str, holders)) or 'unknown'}"
    return (f"data_dir {data_dir} is in use by {who} (it holds {path}); stop it, or wait for "
            "its processes to exit, or use another --data-dir")


def _holders(st: os.stat_result) -> list[int]:
    """Pids with the lock file open (those we may inspect), for the refusal message."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fd_dir = f"/proc/{name}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for n in fds:
            try:
                s = os.stat(f"{fd_dir}/{n}")
            except OSError:
                continue
            if s.st_ino == st.st_ino and s.st_dev == st.st_dev:
                found.append(int(name))
                break
    return sorted(found)


def secure(config: Config) -> None:
    """Create Stoker's private directories and set the modes the module docstring lists."""
    data = config.data_dir
    root = os.geteuid() == 0
    cache = config.cache_dir
    dirs = [os.path.join(data, d) for d in PRIVATE_DIRS]
    dirs += [cache, *(os.path.join(cache, d) for d in CACHE_PRIVATE_DIRS)]
    for d in dirs:
        os.makedirs(d, mode=0o700, exist_ok=True)
        if root:
            _chmod(d, 0o700, follow=d in (data, cache))
    if root:
        _chmod(data, 0o711, follow=True)
    for name in ("lock", "index"):
        _chmod(os.path.join(cache, name), 0o600)


def _chmod(path: str, mode: int, follow: bool = False) -> None:
    """chmod through an fd; without follow, a symlink in place of the entry is refused (the
    configured data and cache directories themselves may be symlinks)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symbolic link; Stoker's data directory must "
                              "hold its own files") from None
        raise
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
