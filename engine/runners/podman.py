"""The podman runner (isolation type `podman`): the command runs in a container of its image
(`container-image: docker://IMAGE`, else `isolation.default_image`), as its slot uid, with
its exec root at /execroot and its TMPDIR at /tmp, both bind-mounted, and no network unless
it asks and is allowed (then slirp4netns, which never reaches the host's loopback).

Podman itself (root) gets a fixed environment of ours: the Command's reaches only the
command, through the spawn helper bind-mounted into the container, which reads it from a
memfd passed in with --preserve-fds and applies it in its final exec. The helper also says
on a status pipe that the container started, so a podman that could not start one is
Stoker's failure (UNAVAILABLE), never the action's exit code.

Podman is run as it works on machines like this one without editing its configuration:
runc where installed (crun refuses hybrid cgroup layouts), cgroupfs, file events, and
rlimits within this process's own hard limits (podman's defaults need CAP_SYS_RESOURCE).
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time

from engine.errors import FailedPrecondition
from engine.runners import recycle, spawn
from engine.runners.bare import _DEFAULT_SIGNALS, _devnull_fd, _exit_code, _wait_exit
from engine.runners.containers import (
    EXEC_ROOT,
    HELPER_IN_CONTAINER,
    USER_NETWORK,
    container_prefix,
    cpu_shares,
    image_of,
    network_of,
    nofile_limit,
    root_in_container,
    user_of,
)
from engine.runners.protocol import RunRequest, RunResult
from engine.runners.user_network import Attached, UserNetworks

log = logging.getLogger(__name__)

PODMAN = "podman"
# Podman's own environment: enough to find its runtime and conmon, nothing of the action's.
PODMAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
PULL_TIMEOUT_S = 300.0
IMAGE_CHECK_TTL_S = 60.0
KILL_GRACE_S = 10.0


def find_podman() -> str | None:
    return shutil.which(PODMAN)


class PodmanRunner:
    """A container per action, through the podman CLI."""

    name = "podman"

    def __init__(self, podman: str, worker: str, *, default_image: str = "",
                 allow_network: bool = False, memory_limited: bool = True,
                 network_mode: str = "none", user_networks: UserNetworks | None = None):
        self.podman = podman
        # Containers of this worker (and data directory: another Stoker's are not ours), found
        # by name to remove what a killed predecessor left.
        self.prefix = container_prefix(worker)
        self.default_image = default_image
        self.allow_network = allow_network
        self.network_mode = network_mode  # isolation.network_mode: bridge = network default
        self.user_networks = user_networks  # None: no user-mode networks here
        self.memory_limited = memory_limited
        self.runtime = shutil.which("runc")
        self.nofile = nofile_limit()
        self._images: dict[str, float] = {}  # image -> when it was last seen present
        self.kept = recycle.KeptContainers(self._remove)

    def global_args(self) -> list[str]:
        # Errors only: podman's warnings would land in the action's stderr.
        return [self.podman, "--cgroup-manager=cgroupfs", "--events-backend=file",
                "--log-level=error"]

    async def _podman(self, *args: str, timeout: float = 60.0) -> tuple[int, str]:
        return await spawn.run_tool([*self.global_args(), *args], PODMAN_ENV, timeout)

    async def ensure_image(self, image: str) -> None:
        seen = self._images.get(image)
        if seen is not None and time.monotonic() - seen < IMAGE_CHECK_TTL_S:
            return
        code, _ = await self._podman("image", "exists", image)
        if code != 0:
            code, said = await self._podman("pull", "--quiet", image, timeout=PULL_TIMEOUT_S)
            if code != 0:
                raise FailedPrecondition(f"container image {image!r} is not on this machine "
                                         f"and could not be pulled: {said[-500:]}")
        self._images[image] = time.monotonic()

    def container_args(self, req: RunRequest, name: str,
                       network: Attached | None = None) -> list[str]:
        """podman run's options for the action's container (its command and image not)."""
        # The action's own user-mode network (as the bare runner's: slirp4netns, no DNS
        # forwarder, never the host's loopback), joined by path; else none.
        net = ["--network", f"ns:{network.netns_file}"] if network else ["--network", "none"]
        if network is not None and self.user_networks is not None:
            servers = self.user_networks.nameservers
            net += [a for s in servers for a in ("--dns", s)] if servers else ["--dns", "none"]
        pids = req.limits.pids or 4096
        args = ["--name", name, "--pull", "never",
                *(["--runtime", self.runtime] if self.runtime else []),
                *net, *self.user_args(req), "--cap-drop", "all",
                "--security-opt", "no-new-privileges",
                "--ulimit", f"nofile={self.nofile}:{self.nofile}",
                "--ulimit", f"nproc={pids}:{pids}", "--pids-limit", str(pids),
                "-v", f"{spawn.require_helper()}:{HELPER_IN_CONTAINER}:ro",
                "-v", f"{req.exec_root}:{EXEC_ROOT}", "-v", f"{req.tmpdir}:/tmp"]
        if self.memory_limited and req.limits.memory_bytes:
            args += ["--memory", str(req.limits.memory_bytes)]
        shares = cpu_shares(req)
        if shares is not None:
            args += ["--cpu-shares", str(shares)]
        return args

    def user_args(self, req: RunRequest, *, exec_: bool = False) -> list[str]:
        """As whom the command runs: its slot uid, or root in a user namespace that maps
        root to it (dockerUser: root)."""
        uid, gid = user_of(req, self.name)
        if not root_in_container(req, self.name):
            return ["--user", f"{uid}:{gid}"]
        if exec_:
            return ["--user", "0:0"]
        return ["--user", "0:0", "--uidmap", f"0:{uid}:1", "--gidmap", f"0:{gid}:1"]

    def run_args(self, req: RunRequest, image: str, name: str,
                 network: Attached | None = None) -> list[str]:
        cwd = _cwd(req)
        return [*self.global_args(), "run", "--rm", *self.container_args(req, name, network),
                "--preserve-fds", "2", "--workdir", cwd, image, HELPER_IN_CONTAINER,
                "--env-fd", "3", "--status-fd", "4", "--report-start", "--cwd", cwd, "--",
                *req.argv]

    def kept_args(self, req: RunRequest, image: str, name: str) -> list[str]:
        """podman run for a kept container: read-only but for its binds (TMPDIR at /var/tmp
        too), holding until it is removed."""
        return [*self.global_args(), "run", "--detach", "--rm",
                *self.container_args(req, name), "--read-only", "--read-only-tmpfs=false",
                "-v", f"{req.tmpdir}:/var/tmp", image, HELPER_IN_CONTAINER, "--in-container",
                "--hold"]

    def exec_args(self, req: RunRequest, name: str) -> list[str]:
        """podman exec of the action in its kept container."""
        cwd = _cwd(req)
        return [*self.global_args(), "exec", *self.user_args(req, exec_=True), "--workdir", cwd,
                "--preserve-fds", "2", name, HELPER_IN_CONTAINER, "--in-container",
                "--env-fd", "3", "--status-fd", "4", "--report-start", "--reap-all",
                *recycle.CLEAN_CHECKS, "--cwd", cwd, "--", *req.argv]

    async def run(self, req: RunRequest) -> RunResult:
        image = image_of(req.platform, self.default_image)
        uid, _ = user_of(req, self.name)
        wants = network_of(req, self.allow_network, self.network_mode) == USER_NETWORK
        if wants and self.user_networks is None:
            raise FailedPrecondition("a network for this action needs slirp4netns and network "
                                     "namespaces, which this executor lacks")
        await self.ensure_image(image)
        if recycle.requested(req.platform) and not wants:
            # An action with a network of its own gets a fresh container: its network is
            # made for it and goes with it.
            return await self._run_kept(req, image)
        network = await self.user_networks.attach(uid) if wants and self.user_networks \
            else None
        try:
            name = f"{self.prefix}{uid}-{secrets.token_hex(4)}"
            result, status = await self._run(req, self.run_args(req, image, name, network),
                                             name)
            return result
        finally:
            if network is not None and self.user_networks is not None:
                await asyncio.shield(self.user_networks.release(network))

    async def _run_kept(self, req: RunRequest, image: str) -> RunResult:
        key = recycle.key_of(req, image)
        name = self.kept.take(key)
        if name is not None:
            try:
                return await self._run_in_kept(req, key, name)
            except spawn.SpawnError as e:
                # The helper never started in it (it is gone or broken since its last
                # action, removed by hand, say), so the action did not run: as BuildBuddy
                # does with a runner it cannot unpause, drop it and start another.
                log.warning("kept container %s did not take the action (%s): starting "
                            "another", name, e)
        assert req.run_as is not None
        name = f"{self.prefix}{req.run_as[0]}-kept-{secrets.token_hex(4)}"
        await self._start_kept(req, image, name)
        return await self._run_in_kept(req, key, name)

    async def _start_kept(self, req: RunRequest, image: str, name: str) -> None:
        """Starts kept container name and notes its holder (pid 1, by its host pid) and
        cgroup; removed again on any failure or cancellation, never left behind."""
        async def start() -> tuple[int, str]:
            code, said = await self._podman(*self.kept_args(req, image, name)[1:])
            if code != 0:
                return code, said
            return await self._podman("inspect", "--format", "{{.State.Pid}}", name)

        started = asyncio.ensure_future(start())
        try:
            code, said = await asyncio.shield(started)
        except BaseException:
            # podman run goes on in its thread: wait for it, then remove what it made.
            await asyncio.shield(asyncio.wait({started}))
            await asyncio.shield(self.kill(name))
            raise
        holder = int(said.strip()) if code == 0 and said.strip().isdigit() else 0
        if holder <= 0:
            await asyncio.shield(self.kill(name))
            raise spawn.SpawnError(f"podman could not start a kept container (exit "
                                   f"{code}): {said.strip()[-500:]}")
        self.kept.started(name, holder)

    async def _run_in_kept(self, req: RunRequest, key: recycle.WarmKey,
                           name: str) -> RunResult:
        clean = False
        try:
            result, status = await self._run(req, self.exec_args(req, name), name)
            clean = (recycle.after_action(status)[1] and not result.timed_out
                     and self.kept.only_holder_left(name))
        finally:
            await self.kept.after(key, name, clean)
        return result

    async def _remove(self, names: list[str]) -> None:
        await self._podman("rm", "--force", "--ignore", "--time", "0", *names)

    async def close(self) -> None:
        """Remove the kept containers (the worker stops)."""
        await self.kept.close()

    async def _run(self, req: RunRequest, args: list[str],
                   name: str) -> tuple[RunResult, str]:
        """Runs podman with args (run or exec of the action in container name): the result
        and what the helper said on its status pipe."""
        env = dict(req.env)
        env.setdefault("TMPDIR", "/tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        opened: list[int] = []
        status_r = -1
        try:
            out_fd = os.open(req.stdout_path, flags, 0o600)
            opened.append(out_fd)
            err_fd = os.open(req.stderr_path, flags, 0o600)
            opened.append(err_fd)
            opened.append(spawn.env_memfd(env))
            status_r, status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            opened.append(status_w)
            # Copies above 4 first, so that placing them at 3 and 4 clobbers neither.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5) for fd in opened[2:4]]
            opened += high
        except BaseException:
            for fd in opened:
                os.close(fd)
            if status_r >= 0:
                os.close(status_r)
            raise
        start = time.time()
        try:
            pid = os.posix_spawn(args[0], args, PODMAN_ENV, setsid=True,
                                 setsigdef=_DEFAULT_SIGNALS, file_actions=[
                (os.POSIX_SPAWN_DUP2, _devnull_fd(), 0), (os.POSIX_SPAWN_DUP2, out_fd, 1),
                (os.POSIX_SPAWN_DUP2, err_fd, 2), (os.POSIX_SPAWN_DUP2, high[0], 3),
                (os.POSIX_SPAWN_DUP2, high[1], 4)])
        except OSError as e:
            os.close(status_r)
            raise spawn.SpawnError(f"cannot start podman: {e}") from e
        finally:
            for fd in opened:
                os.close(fd)
        try:
            result = await self._wait(pid, name, req, start)
            status = spawn.read_available(status_r)
        finally:
            os.close(status_r)
        if not status.startswith("X"):
            said = spawn.head_of(req.stderr_path)
            raise spawn.SpawnError(f"podman could not start the container (exit "
                                   f"{result.exit_code})" + (f": {said}" if said else ""))
        command_said = status.partition("\n")[0]
        if command_said[1:2] == "E":
            result.spawn_error = f"cannot execute {req.argv[0]!r}: " \
                                 f"{command_said[2:].partition(' ')[2]}"
        return result, status

    async def _wait(self, pid: int, name: str, req: RunRequest, start: float) -> RunResult:
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(pid)
        try:
            timed_out = not await _wait_exit(loop, pidfd, req.timeout_s)
            if timed_out:
                await self.kill(name)
                if not await _wait_exit(loop, pidfd, KILL_GRACE_S):
                    os.kill(pid, signal.SIGKILL)
            end = time.time()
            _, status, _ = os.wait4(pid, 0)
            # podman's own rusage is not the action's (that is conmon's child's): none.
            return RunResult(_exit_code(status), timed_out, start, end, None)
        except BaseException:
            # Cancelled: the client first (so it starts no container after the removal),
            # then the container (podman run would leave it to conmon).
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await asyncio.shield(_reaped(loop, pid, pidfd))
            await asyncio.shield(self.kill(name))
            raise
        finally:
            os.close(pidfd)

    async def kill(self, name: str) -> None:
        await self.kept.remove([name])

    async def remove_leftovers(self) -> int:
        """Remove this worker's containers a predecessor left (a killed worker's)."""
        code, out = await self._podman("ps", "--all", "--quiet", "--filter",
                                       f"name=^{self.prefix}")
        ids = out.split() if code == 0 else []
        if ids:
            await self._podman("rm", "--force", "--ignore", "--time", "0", *ids)
        return len(ids)


@functools.lru_cache(maxsize=64)  # a machine fact: asked once per process
def probe(podman: str | None) -> str | None:
    """Why podman cannot run containers here, or None when it can."""
    if podman is None:
        return f"{PODMAN} is not installed"
    if spawn.helper_path() is None:
        return "the spawn helper (engine/_spawn) is not installed"
    try:
        r = subprocess.run([podman, "--cgroup-manager=cgroupfs", "--events-backend=file",
                            "info", "--format", "{{.Host.OCIRuntime.Name}}"], env=PODMAN_ENV,
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return f"{PODMAN} info did not answer within 60 s"
    if r.returncode != 0:
        return f"{PODMAN} info failed: {r.stderr.strip()[-300:]}"
    return None


def _cwd(req: RunRequest) -> str:
    return os.path.normpath(os.path.join(EXEC_ROOT, req.working_directory))


async def _reaped(loop: asyncio.AbstractEventLoop, pid: int, pidfd: int) -> None:
    await _wait_exit(loop, pidfd, 0)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
