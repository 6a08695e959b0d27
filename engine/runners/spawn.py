"""The spawn helper (native/spawn/stoker_spawn.c, installed as engine/_spawn): how a root
worker starts an action without any process of uid 0 seeing the Command's environment.

The worker posix_spawns (vfork) the helper with an EMPTY environment; the Command's
environment travels as data through a memfd, and the helper applies it only in its final
exec, already as the slot uid with no capabilities. Which namespaces, limits and mounts the
helper sets up is decided here, from the containment mechanism and the request."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.errors import InvalidArgument, StokerError, Unavailable
from engine.platform import value_of
from engine.runners.protocol import Platform, RunRequest, RunResult

HELPER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_spawn")

# The world-writable places where every action gets a private, bounded tmpfs of its own
# (in its mount namespace), so nothing written there reaches another action.
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm")
ACTION_OOM_SCORE_ADJ = 1000  # an action is always the OOM killer's first choice


class SpawnError(Unavailable):
    """Stoker could not set the action up (not the action's fault): retried elsewhere."""


@functools.cache
def helper_path() -> str | None:
    return HELPER if os.access(HELPER, os.X_OK) else None


def require_helper() -> str:
    path = helper_path()
    if path is None:
        raise StokerError(f"the spawn helper {HELPER} is missing: reinstall Stoker with a C "
                          "compiler and libseccomp-dev (pip install . builds it)")
    return path


def environment(req: RunRequest) -> dict[str, str]:
    """The Command's environment plus TMPDIR (unless it sets one), checked for what no
    process environment can hold."""
    for name, value in req.env.items():
        if not name or "=" in name or "\0" in name:
            raise InvalidArgument(f"Command.environment_variables: name {name!r} is empty or "
                                  "holds '=' or NUL")
        if "\0" in value:
            raise InvalidArgument(f"Command.environment_variables: {name} holds a NUL byte")
    for i, arg in enumerate(req.argv):
        if "\0" in arg:
            raise InvalidArgument(f"Command.arguments[{i}] holds a NUL byte")
    env = dict(req.env)
    env.setdefault("TMPDIR", req.tmpdir)
    return env


# Platform properties by which an action asks for a network beyond its own loopback
# (BuildBuddy's dockerNetwork, and a plain `network`), and the values that ask for none.
NETWORK_PROPERTIES = ("dockerNetwork", "network")
NO_NETWORK = ("", "off", "none", "false", "loopback")


def network_requested(platform: Platform) -> str | None:
    """'name=value' of the property asking for network access, or None."""
    for name in NETWORK_PROPERTIES:
        value = value_of(platform, name)
        if value is not None and value.lower() not in NO_NETWORK:
            return f"{name}={value}"
    return None


def nul_separated(items: list[str]) -> bytes:
    return b"".join(i.encode("utf-8", "surrogateescape") + b"\0" for i in items)


def env_bytes(env: dict[str, str]) -> bytes:
    """env as NAME=VALUE\\0 entries, as the helper reads it (--env-fd, --env-file)."""
    return nul_separated([f"{k}={v}" for k, v in env.items()])


def memfd_of(data: bytes, name: str) -> int:
    """A close-on-exec memfd holding data, at offset 0."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def env_memfd(env: dict[str, str]) -> int:
    """A memfd holding env as NAME=VALUE\\0 entries, at offset 0."""
    return memfd_of(env_bytes(env), "stoker-env")


def read_available(fd: int) -> str:
    """All a non-blocking pipe holds now (to EOF once its writers are gone)."""
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


def head_of(path: str, size: int = 2000) -> str:
    """The first size bytes of a file, as text ('' when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(size).decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class Launch:
    """How the helper starts one action: its options (but for the env and status fds), the
    command it execs last, that exec's environment, and fds opened for the action that the
    command is handed (the helper passes these on; the worker closes its copies once the
    helper is started)."""
    options: list[str]
    command: list[str]
    env: dict[str, str]
    fds: list[int] = field(default_factory=list)
    # Called with the result once every process is gone; raises when the command never
    # started (a wrapper's own failure: SpawnError). It reads `kept` (the worker's ends of
    # pipes the command writes to), which finish() closes either way.
    check: Callable[[RunResult], None] | None = None
    kept: list[int] = field(default_factory=list)

    def argv(self, env_fd: int, status_fd: int) -> list[str]:
        passed = [a for fd in self.fds for a in ("--pass-fd", str(fd))]
        return [require_helper(), "--status-fd", str(status_fd), "--env-fd", str(env_fd),
                *self.options, *passed, "--", *self.command]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def finish(self, result: RunResult | None) -> None:
        """After the command (result None: it did not start, or its wait failed)."""
        try:
            if result is not None and self.check is not None:
                self.check(result)
        finally:
            for fd in self.kept:
                os.close(fd)
            self.kept = []


def helper_options(req: RunRequest, *, cgroup_procs: list[str], deny_userns: bool,
                   namespaces: bool = False, netns: bool = False, tmp_bytes: int = 0,
                   netns_file: str | None = None, resolv_conf: str | None = None,
                   hide: tuple[str, ...] = ()) -> list[str]:
    """The helper's options for req: its uid, limits and cgroups; with namespaces, the pid,
    ipc, network and mount namespaces of the bare runner's containment; with netns alone,
    only the network namespace (for a command that makes the rest itself)."""
    args = ["--cwd", req.cwd, "--oom-score-adj", str(ACTION_OOM_SCORE_ADJ)]
    if req.run_as is not None:
        uid, gid = req.run_as
        # Keyrings only of a slot uid: Stoker's own user's are its operator's business.
        args += ["--uid", str(uid), "--gid", str(gid), "--clear-keyrings"]
    if req.limits.pids:
        args += ["--nproc", str(req.limits.pids)]
    for procs in cgroup_procs:
        args += ["--cgroup", procs]
    if namespaces:
        args += ["--pidns", "--ipcns", "--mountns"]
    if namespaces or netns:
        args.append("--netns")
        if netns_file is not None:
            args += ["--netns-file", netns_file]
    if namespaces:
        if resolv_conf is not None:
            args += ["--resolv-conf", resolv_conf]
        # The host's files are read-only in the action's mount namespace; these are empty
        # (other actions' directories, the data directory), then its own come back.
        for path in hide:
            args += ["--hide", path]
        for path in private_tmp():
            args += ["--tmpfs", path]
        args += ["--tmp-size", str(tmp_bytes)]
        for keep in {_real(req.exec_root), _real(req.tmpdir)}:
            args += ["--keep", keep]
    if deny_userns:
        args.append("--deny-userns")
    return args


@functools.cache
def private_tmp() -> tuple[str, ...]:
    """PRIVATE_TMP as this machine has them: resolved, each once (/var/tmp may be /tmp)."""
    seen: dict[str, None] = {}
    for path in PRIVATE_TMP:
        if os.path.isdir(path):
            seen.setdefault(os.path.realpath(path))
    return tuple(seen)


@functools.lru_cache(maxsize=1024)
def _real(path: str) -> str:
    """realpath of an action's directory: a slot's paths repeat, and their parents are
    root's (no action can make one a symlink), so the answer is kept."""
    return os.path.realpath(path)


class SlotNetworks:
    """Where each slot uid's network namespace is kept between its actions (the helper makes
    it on first use and joins it after: see join_or_make_netns in native/spawn/)."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._ready: set[int] = set()

    def file_for(self, uid: int) -> str:
        path = os.path.join(self.directory, f"netns-{uid}")
        if uid not in self._ready:
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            self._ready.add(uid)
        return path

    def release(self) -> None:
        """Unmount and remove every kept namespace (it goes once no process is in it)."""
        libc = ctypes.CDLL(None, use_errno=True)
        for entry in os.scandir(self.directory):
            if entry.name.startswith("netns-"):
                libc.umount2(entry.path.encode(), _MNT_DETACH)
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass
        self._ready.clear()


_MNT_DETACH = 2


def read_status(fd: int) -> tuple[str, str] | None:
    """What the helper reported: ('S', text) for a setup failure, ('E', text) for a command
    that could not be executed, None when the exec worked."""
    try:
        data = os.read(fd, 4096)
    except BlockingIOError:
        return None
    if not data:
        return None
    text = data.decode(errors="replace")  # "S<errno> <text>" or "E<errno> <text>"
    return text[0], text[1:].partition(" ")[2]


async def run_tool(argv: list[str], env: dict[str, str],
                   timeout: float) -> tuple[int, str]:
    """Run a helper tool of Stoker's (podman, the spawn helper's --make-netns) to completion:
    (exit code, stdout and stderr). subprocess.run in a thread, which vforks: the event loop's
    own subprocess support (uvloop's) forks the worker, gRPC threads and all. -1 when it did
    not finish within timeout (it is killed) or could not start."""
    def run() -> tuple[int, str]:
        try:
            done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return -1, f"timed out after {timeout:.0f} s"
        except OSError as e:
            return -1, str(e)
        return done.returncode, done.stdout.decode(errors="replace").strip()

    return await asyncio.to_thread(run)
