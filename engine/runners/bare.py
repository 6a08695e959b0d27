"""The bare runner (isolation type `none`): start one command and wait for it without blocking
the event loop; when it exits, times out or is cancelled, every process it started is dead
before run() returns (engine/runners/containment.py says how, per mechanism).

Spawning never forks the worker (a process full of gRPC threads): subprocess.Popen vforks
as long as it changes no ids. Actions that run as a slot uid go through the spawn helper
(engine/runners/spawn.py), which alone sets up namespaces, limits and the uid, and applies
the Command's environment only in its final exec.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import signal
import subprocess
import time

from engine.config import Config
from engine.errors import FailedPrecondition
from engine.runners import cgroups, containment, spawn
from engine.runners.cgroups import ActionCgroups
from engine.runners.protocol import RunRequest, RunResult
from engine.runners.user_network import Attached, UserNetworks

# Errors of ours when starting even a direct command: retried, never the action's exit code.
_NOT_THE_ACTIONS = (errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE)

# Python ignores these; a child must not inherit that (Popen's restore_signals).
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)

# Rounds of scan-and-kill before giving up on a session that keeps forking.
_KILL_ROUNDS = 20


@functools.cache
def _devnull_fd() -> int:
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def find_executable(argv0: str, env: dict[str, str], cwd: str) -> tuple[str, bool] | None:
    """Where argv0 is: (path, found through PATH), or None.

    With a '/' it is a path (relative ones from cwd). Without one it is looked up in the
    Command's PATH (the system default when the Command sets none; relative entries are
    relative to cwd), then taken literally from cwd (the pre-v2.3 reading).
    """
    if "/" in argv0:
        return os.path.join(cwd, argv0), False
    for d in env.get("PATH", os.defpath).split(":"):
        cand = os.path.join(cwd, d or ".", argv0)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand, True
    literal = os.path.join(cwd, argv0)
    if os.path.exists(literal):
        return literal, False
    return None


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _spawn_error_code(e: BaseException) -> int:
    if isinstance(e, OSError) and e.errno in (errno.ENOENT, errno.ENOTDIR):
        return 127
    return 126


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is sid."""
    out = []
    for entry in os.scandir("/proc"):
        name = entry.name
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue  # exited meanwhile
        # Fields after the command name, which may itself contain ') ': state ppid pgrp
        # session ... num_threads (the 18th). A zombie leader with live threads is alive.
        fields = data.rpartition(b")")[2].split()
        if len(fields) > 17 and int(fields[3]) == sid and (
                fields[0] != b"Z" or int(fields[17]) > 1):
            out.append(int(name))
    return out


def kill_session(sid: int) -> None:
    """SIGKILL the process group sid and every process of session sid, until none is left.

    Processes that moved to another process group are found through their session id; one
    that started a new session of its own escapes (that needs a cgroup or a PID namespace).
    """
    for _ in range(_KILL_ROUNDS):
        try:
            os.killpg(sid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pids = session_members(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def _wait_exit(loop: asyncio.AbstractEventLoop, pidfd: int, timeout: float) -> bool:
    """Wait for the process behind pidfd to exit (True) or for timeout seconds (False).
    It is not reaped, so its pid cannot be reused while we still signal its session."""
    fut = loop.create_future()

    def finish(exited: bool) -> None:
        if not fut.done():
            fut.set_result(exited)

    loop.add_reader(pidfd, finish, True)
    timer = loop.call_later(timeout, finish, False) if timeout > 0 else None
    try:
        return await fut
    finally:
        loop.remove_reader(pidfd)
        if timer is not None:
            timer.cancel()


def _reap_later(loop: asyncio.AbstractEventLoop, pid: int, pidfd: int) -> None:
    def reap() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass

    loop.add_reader(pidfd, reap)


def _write_error(fd: int, message: str) -> None:
    try:
        os.write(fd, f"stoker: {message}\n".encode(errors="replace"))
    except OSError:
        pass


def _direct(req: RunRequest, env: dict[str, str]) -> tuple[list[str], str]:
    """(args, executable) for an action that runs as Stoker itself; FileNotFoundError when
    argv[0] is nowhere."""
    found = find_executable(req.argv[0], env, req.cwd)
    if found is None:
        path = env.get("PATH", os.defpath)
        raise FileNotFoundError(errno.ENOENT, f"not found in PATH ({path}) or in the working "
                                f"directory", req.argv[0])
    return list(req.argv), found[0]


class BareRunner:
    """Isolation type `none`: the command runs on the host's files, as its slot uid where
    Stoker is root, contained by the strongest mechanism this process may use."""

    name = "none"

    def __init__(self, mechanism: str, cgroups: ActionCgroups | None = None,
                 tmp_bytes: int = Config.action_tmp_bytes, deny_userns: bool = False,
                 networks: spawn.SlotNetworks | None = None, hide: tuple[str, ...] = (),
                 allow_network: bool = False, user_networks: UserNetworks | None = None):
        self.mechanism = mechanism
        self.cgroups = cgroups
        self.networks = networks  # None: a new network namespace for every action
        # Actions that ask for network get it (actions_may_request_network): the host's
        # where they share it anyway, else a user-mode one (None: slirp4netns is missing).
        self.allow_network = allow_network
        self.user_networks = user_networks
        # Directories an action must not see (the data and build directories): each is an
        # empty tmpfs in its mount namespace, its own directories bound back in.
        self.hide = tuple(os.path.realpath(p) for p in hide)
        self.tmp_bytes = tmp_bytes
        self.deny_userns = deny_userns

    async def run(self, req: RunRequest) -> RunResult:
        return await run(req, self.mechanism, self)

    def netns_file(self, req: RunRequest, network: Attached | None) -> str | None:
        """The network namespace the action joins: its user-mode one, else its slot's kept
        one (None: a new one, or none where there are no namespaces)."""
        if network is not None:
            return network.netns_file
        if self.networks is not None and req.run_as is not None:
            return self.networks.file_for(req.run_as[0])
        return None

    def launch(self, req: RunRequest, env: dict[str, str], mechanism: str,
               cgroup_procs: list[str], network: Attached | None) -> spawn.Launch:
        """The helper sets up the whole containment and execs the command itself."""
        netns_file = self.netns_file(req, network)
        options = spawn.helper_options(
            req, cgroup_procs=cgroup_procs, deny_userns=self.deny_userns,
            namespaces=mechanism == containment.PID_NAMESPACE, tmp_bytes=self.tmp_bytes,
            netns_file=netns_file, resolv_conf=network.resolv_conf if network else None,
            hide=self.hide)
        return spawn.Launch(options, list(req.argv), env)


async def run(req: RunRequest, mechanism: str = containment.SESSION,
              settings: BareRunner | None = None) -> RunResult:
    if not req.argv:
        raise ValueError("RunRequest.argv is empty")
    settings = settings or BareRunner(mechanism)
    network = await _network_for(req, mechanism, settings)
    try:
        return await _run(req, mechanism, settings, network)
    finally:
        if network is not None:
            assert settings.user_networks is not None
            # Shielded: cancelled halfway, the namespace and slirp4netns would be left.
            await asyncio.shield(settings.user_networks.release(network))


async def _network_for(req: RunRequest, mechanism: str,
                       settings: BareRunner) -> Attached | None:
    """The user-mode network of an action that asks for one, or None (its own loopback, or
    the host's network where actions share it); refused when not allowed or not possible."""
    wanted = spawn.network_requested(req.platform)
    if wanted is None:
        return None
    if not settings.allow_network:
        raise FailedPrecondition(f"platform property {wanted}: network access for actions is "
                                 "not allowed on this executor (actions_may_request_network "
                                 "is off; actions get a loopback of their own only)")
    if mechanism != containment.PID_NAMESPACE:
        return None  # no namespaces here: every action has the host's network already
    if wanted.lower().endswith("=host"):
        raise FailedPrecondition(f"platform property {wanted}: the host's network is not "
                                 "given to actions (it holds Stoker's loopback listeners); "
                                 "dockerNetwork=bridge gets a user-mode network")
    if settings.user_networks is None or req.run_as is None:
        raise FailedPrecondition(f"platform property {wanted}: network for actions needs "
                                 "slirp4netns, which this machine lacks")
    return await settings.user_networks.attach(req.run_as[0])


async def _run(req: RunRequest, mechanism: str, settings: BareRunner,
               network: Attached | None) -> RunResult:
    env = spawn.environment(req)
    cgroup_procs: list[str] = []
    if req.run_as is not None and settings.cgroups is not None:
        cgroup_procs = settings.cgroups.prepare(req.run_as[0], req.limits.memory_bytes,
                                                cgroups.cpu_shares(req.platform))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    out_fd = os.open(req.stdout_path, flags, 0o600)
    try:
        err_fd = os.open(req.stderr_path, flags, 0o600)
    except BaseException:
        os.close(out_fd)
        raise
    env_fd = status_w = status_r = -1
    launch: spawn.Launch | None = None
    # Without the helper (not installed), only an action that runs as Stoker itself, and
    # Stoker not root, may start: the CLI refuses the rest.
    via_helper = req.run_as is not None or spawn.helper_path() is not None
    start = time.time()
    try:
        if not via_helper:
            args, executable = _direct(req, env)
            proc = subprocess.Popen(
                args, executable=executable, stdin=_devnull_fd(), stdout=out_fd,
                stderr=err_fd, cwd=req.cwd, env=env, start_new_session=True, close_fds=True)
            proc.returncode = 0  # reaped by _wait, never by Popen
            pid = proc.pid
        else:
            # Nothing of the Command in this root process's exec: the helper gets an empty
            # environment and reads its command's from env_fd (engine/runners/spawn.py).
            launch = settings.launch(req, env, mechanism, cgroup_procs, network)
            env_fd = spawn.env_memfd(launch.env)
            status_r, status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            args = launch.argv(env_fd, status_w)
            # posix_spawn (a vfork) with no Popen around it: the cheapest way to start a
            # process here. Only these fds reach the helper (dup2 onto itself clears
            # close-on-exec); the helper marks any other close-on-exec before it execs.
            pid = os.posix_spawn(args[0], args, {}, setsid=True, setsigdef=_DEFAULT_SIGNALS,
                                 file_actions=[
                (os.POSIX_SPAWN_DUP2, _devnull_fd(), 0), (os.POSIX_SPAWN_DUP2, out_fd, 1),
                (os.POSIX_SPAWN_DUP2, err_fd, 2), (os.POSIX_SPAWN_DUP2, env_fd, env_fd),
                (os.POSIX_SPAWN_DUP2, status_w, status_w),
                *((os.POSIX_SPAWN_DUP2, fd, fd) for fd in launch.fds)])
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        if status_r >= 0:
            os.close(status_r)
        if launch is not None:
            launch.finish(None)
        if via_helper or (isinstance(e, OSError) and e.errno in _NOT_THE_ACTIONS):
            raise spawn.SpawnError(f"cannot start the action: {e}") from e
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        message = f"cannot execute {req.argv[0]!r}: {detail}"
        _write_error(err_fd, message)
        return RunResult(_spawn_error_code(e), False, start, time.time(), None, message)
    finally:
        # The child has its copies; keeping ours would hold files of the action open.
        for fd in (out_fd, err_fd, env_fd, status_w):
            if fd >= 0:
                os.close(fd)
        if launch is not None:
            launch.close()
    waited: RunResult | None = None
    try:
        waited = await _wait(pid, req, mechanism, start)
    finally:
        reported = spawn.read_status(status_r) if status_r >= 0 else None
        if status_r >= 0:
            os.close(status_r)
        if launch is not None:
            # The helper's own failure comes first; the wrapper's check only after it.
            launch.finish(waited if reported is None or reported[0] != "S" else None)
    result = waited
    if reported is not None and reported[0] == "S":
        raise spawn.SpawnError(f"setting the action up failed: {reported[1]}")
    if reported is not None:
        result.spawn_error = f"cannot execute {req.argv[0]!r}: {reported[1]}"
    if cgroup_procs:  # only an action in a memory cgroup can be killed for its limit
        assert req.run_as is not None and settings.cgroups is not None
        result.oom_killed = settings.cgroups.oom_killed(req.run_as[0])
    return result


async def _wait(pid: int, req: RunRequest, mechanism: str, start: float) -> RunResult:
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(pid)
    handed_off = reaped = False
    try:
        timed_out = not await _wait_exit(loop, pidfd, req.timeout_s)
        if timed_out:
            await _end_all(loop, mechanism, pid, pidfd)
        else:
            # Leftovers that stayed in the process group die with the action. (A full scan
            # for the session costs ~1 ms, so it is only done on timeout and cancellation.)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        end = time.time()
        _, status, rusage = os.wait4(pid, 0)
        reaped = True
        if req.run_as is not None and mechanism == containment.UID_SWEEP:
            await _sweep(req.run_as[0])
        return RunResult(_exit_code(status), timed_out, start, end, rusage)
    except BaseException:
        # Cancelled (or failing) while the action runs: kill it, reap it when it is gone.
        # The caller sweeps the slot's uid before it reuses the directory.
        if not reaped:
            if mechanism == containment.PID_NAMESPACE:
                # Its pid 1 may have left the session; its parent-death signal would take
                # it down with the helper, but only once the helper is gone.
                for child in _namespace_inits(pid):
                    try:
                        os.kill(child, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            kill_session(pid)
            _reap_later(loop, pid, pidfd)
            handed_off = True
        raise
    finally:
        if not handed_off:
            os.close(pidfd)


def _namespace_inits(pid: int) -> list[int]:
    """The children of unshare (pid): the pid 1 of the action's namespace."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


async def _end_all(loop: asyncio.AbstractEventLoop, mechanism: str, pid: int,
                   pidfd: int) -> None:
    """Kill the timed-out action and everything it started; return once they are gone (but
    for a uid sweep, which comes once the action's own pid is reaped)."""
    inits: list[int] = []
    if mechanism == containment.PID_NAMESPACE:
        for child in _namespace_inits(pid):
            try:
                inits.append(os.pidfd_open(child))
            except OSError:
                pass  # already gone
    try:
        for fd in inits:
            # The namespace's pid 1 dying takes every process of the namespace with it.
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if inits:
            # Its parent (the helper, or bwrap) reaps it and exits; killed first, it would
            # leave pid 1 a zombie for init to reap.
            await _wait_exit(loop, pidfd, 1.0)
        kill_session(pid)
        await _wait_exit(loop, pidfd, 0)
        for fd in inits:
            # Its exit completes only once the whole namespace is gone.
            await _wait_exit(loop, fd, 0)
    finally:
        for fd in inits:
            os.close(fd)


async def _sweep(uid: int) -> None:
    survivors = await asyncio.to_thread(containment.sweep, [uid])
    if survivors:
        raise containment.SurvivorsError(uid, survivors)
