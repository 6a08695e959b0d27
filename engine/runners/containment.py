"""Keeping an action's processes in check: every process an action started is dead before its
outputs are collected and before its directory is reused.

The mechanism is chosen once per worker (strongest first) and shown in /statusz:
- pid-namespace: the command runs as pid 1 of pid, ipc, network and mount namespaces of
  its own (the spawn helper, engine/runners/spawn.py), with its own /proc, /tmp and
  /dev/shm and only a loopback interface. When it exits, the kernel kills every other
  process of the namespace, and its exit completes only once they are all gone: setsid,
  setpgid and double-forked survivors included, with nothing to scan. On a timeout or a
  cancel the runner kills that pid 1 itself. Needs CAP_SYS_ADMIN (root, outside a container
  that dropped it).
- uid-sweep: each slot runs as a uid of its own, so after the command exits every process
  with that uid is one of the action's: read them from /proc and SIGKILL them until none is
  left (Buildbarn's process-table cleaning). Needs root; costs a scan of /proc per action.
- session: Stoker is not root, so actions share its uid and only the action's session can be
  killed; a process that starts a session of its own survives. Stoker warns at start.

Actions also run with no_new_privs (set on the worker, inherited): a setuid binary cannot
hand an action process another uid, which would take it out of its slot's sweep.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable

from engine.errors import FailedPrecondition
from engine.runners import spawn

log = logging.getLogger(__name__)

PID_NAMESPACE = "pid-namespace"
UID_SWEEP = "uid-sweep"
SESSION = "session"

_PR_SET_NO_NEW_PRIVS = 38
# A survivor in uninterruptible sleep (D state) can take a while to die; past this the slot
# is reported unusable rather than reused with a live process in it.
_SWEEP_DEADLINE_S = 10.0


# Benchmarks set this to measure a weaker mechanism (uid-sweep, or session: what Stoker did
# before containment) beside the default in one run. Never stronger than what detect finds.
FORCE_ENV = "STOKER_CONTAINMENT"


def detect(separate_uids: bool) -> str:
    """The strongest mechanism this process can use (see the module docstring)."""
    forced = os.environ.get(FORCE_ENV)
    if forced not in (SESSION, UID_SWEEP):
        forced = None
    if forced == SESSION:
        return SESSION
    if os.geteuid() != 0:
        return SESSION
    if forced == UID_SWEEP and separate_uids:
        return UID_SWEEP
    if not forced and _helper_runs("--pidns", "--ipcns", "--netns", "--mountns",
                                    "--tmpfs", "/tmp:1m"):
        return PID_NAMESPACE
    return UID_SWEEP if separate_uids else SESSION


def denies_user_namespaces() -> bool:
    """Whether the spawn helper can keep actions from making user namespaces (seccomp)."""
    return os.geteuid() == 0 and _helper_runs("--deny-userns")


def _helper_runs(*options: str) -> bool:
    helper = spawn.helper_path()
    if helper is None:
        return False
    try:
        done = subprocess.run([helper, *options, "--", "/bin/true"], env={},
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def set_no_new_privs() -> None:
    """Inherited by every action this process spawns (see the module docstring)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


def _field(data: bytes, name: bytes) -> bytes:
    """The value of one line of /proc/PID/status ('\nUid:' -> b'60000 60000 ...')."""
    i = data.find(name)
    if i < 0:
        return b""
    i += len(name)
    return data[i:data.find(b"\n", i)].strip()


def processes_of(uids: Iterable[int]) -> tuple[list[int], list[int]]:
    """(live pids, zombie children of ours) of processes with any of their ids in uids.

    /proc/PID/status rather than the owner of /proc/PID: a process that made itself
    non-dumpable shows a /proc entry owned by root. Read with one read() and searched, not
    parsed: this runs once per action where pid namespaces are refused."""
    wanted = set(uids)
    me = os.getpid()
    live: list[int] = []
    zombies: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{name}/status", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile
        try:
            data = os.read(fd, 4096)  # Uid is within the first few hundred bytes
        except OSError:
            continue
        finally:
            os.close(fd)
        ids = _field(data, b"\nUid:").split()
        if not wanted.intersection(map(int, ids)):
            continue
        # A zombie leader whose other threads still run is alive (the status of a thread
        # group is its leader's, which shows Z once the leader alone has exited).
        if _field(data, b"\nState:")[:1] == b"Z" and _field(data, b"\nThreads:") in (b"", b"1"):
            if int(_field(data, b"\nPPid:") or 0) == me:
                zombies.append(int(name))
        else:
            live.append(int(name))
    return live, zombies


def sweep(uids: Iterable[int], deadline_s: float = _SWEEP_DEADLINE_S) -> list[int]:
    """SIGKILL every process of uids until none is left; the pids still alive at the
    deadline (empty when the sweep succeeded)."""
    uids = list(uids)
    end = time.monotonic() + deadline_s
    pause = 0.0005
    while True:
        live, zombies = processes_of(uids)
        for pid in zombies:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        if not live:
            return []
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > end:
            return live
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


class SurvivorsError(FailedPrecondition):
    """Processes of an action outlived every attempt to kill them (a fork bomb, say): its
    outputs cannot be trusted and its uid is set aside until they are gone. The action's
    doing, so not retried elsewhere."""

    def __init__(self, uid: int, pids: list[int]):
        super().__init__(f"the action's processes {pids[:10]} (uid {uid}) survived SIGKILL "
                         f"for {_SWEEP_DEADLINE_S:g}s; its outputs are not collected")
        self.uid = uid
        self.pids = pids
