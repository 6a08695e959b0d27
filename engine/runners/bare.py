"""The bare runner: start one command in its own session and wait for it without blocking the
event loop; when it exits, times out or is cancelled, every process it started is dead before
run() returns (engine/runners/containment.py says how, per mechanism).

Spawning: subprocess.Popen uses vfork here as long as it does not change uid/gid; with
user=/group= it falls back to fork, which costs 13 ms from a 300 MB process against 0.7 ms
(measured on this machine). So run_as goes through one util-linux exec that changes the ids
(and, under pid-namespace containment, makes the namespace): `unshare --setuid --setgid` or
`setpriv`, and Popen(user=, group=) only when neither is installed.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import signal
import subprocess
import time

from engine.runners import containment
from engine.runners.protocol import RunRequest, RunResult

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


def _command_line(req: RunRequest, env: dict[str, str], mechanism: str
                  ) -> tuple[list[str], str, dict]:
    """(args, executable, extra Popen arguments), or raises FileNotFoundError."""
    found = find_executable(req.argv[0], env, req.cwd)
    if found is None:
        path = env.get("PATH", os.defpath)
        raise FileNotFoundError(errno.ENOENT, f"not found in PATH ({path}) or in the working "
                                f"directory", req.argv[0])
    exe, via_path = found
    if req.run_as is None:
        return list(req.argv), exe, {}
    uid, gid = req.run_as
    # unshare and setpriv exec with execvp under the action's env and cwd: a bare name found
    # through PATH is found again the same way, and argv[0] stays what the Command says.
    target = req.argv[0] if via_path or "/" in req.argv[0] else exe
    unshare = containment.unshare_path()
    if mechanism == containment.PID_NAMESPACE and unshare is not None:
        # unshare drops the supplementary groups when it sets the gid. An IPC namespace of its
        # own too: System V IPC objects the action leaves die with it instead of reaching
        # the next action of the same uid.
        args = [unshare, "--pid", "--ipc", "--fork", "--kill-child", f"--setuid={uid}",
                f"--setgid={gid}", "--", target, *req.argv[1:]]
        return args, unshare, {}
    setpriv = containment.setpriv_path()
    if setpriv is None:
        return list(req.argv), exe, {"user": uid, "group": gid, "extra_groups": []}
    args = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", target,
            *req.argv[1:]]
    return args, setpriv, {}


class BareRunner:
    """Isolation type `none`: the command runs on the host, as its slot uid where Stoker is
    root, contained by the strongest mechanism this process may use (containment.py)."""

    name = "none"

    def __init__(self, mechanism: str):
        self.mechanism = mechanism

    async def run(self, req: RunRequest) -> RunResult:
        return await run(req, self.mechanism)


async def run(req: RunRequest, mechanism: str = containment.SESSION) -> RunResult:
    if not req.argv:
        raise ValueError("RunRequest.argv is empty")
    env = dict(req.env)
    env.setdefault("TMPDIR", req.tmpdir)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    out_fd = os.open(req.stdout_path, flags, 0o600)
    try:
        err_fd = os.open(req.stderr_path, flags, 0o600)
    except BaseException:
        os.close(out_fd)
        raise
    start = time.time()
    try:
        args, executable, extra = _command_line(req, env, mechanism)
        proc = subprocess.Popen(
            args, executable=executable, stdin=_devnull_fd(), stdout=out_fd, stderr=err_fd,
            cwd=req.cwd, env=env, start_new_session=True, close_fds=True, **extra)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        message = f"cannot execute {req.argv[0]!r}: {detail}"
        _write_error(err_fd, message)
        return RunResult(_spawn_error_code(e), False, start, time.time(), None, message)
    finally:
        # The child has its copies; keeping ours would hold files of the action open.
        os.close(out_fd)
        os.close(err_fd)

    pid = proc.pid
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(pid)
    handed_off = False
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
        proc.returncode = _exit_code(status)  # so Popen never waits for this pid again
        if req.run_as is not None and mechanism == containment.UID_SWEEP:
            await _sweep(req.run_as[0])
        return RunResult(proc.returncode, timed_out, start, end, rusage)
    except BaseException:
        # Cancelled (or failing) while the action runs: kill it, reap it when it is gone.
        # The caller sweeps the slot's uid before it reuses the directory.
        if proc.returncode is None:
            if mechanism == containment.PID_NAMESPACE:
                # Its pid 1 may have left the session, and unshare's --kill-child does not
                # survive --setuid (a credential change clears the parent-death signal).
                for child in _namespace_inits(pid):
                    try:
                        os.kill(child, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            kill_session(pid)
            proc.returncode = -signal.SIGKILL
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
        kill_session(pid)
        for fd in inits:
            # The namespace's pid 1 dying takes every process of the namespace with it.
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
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
