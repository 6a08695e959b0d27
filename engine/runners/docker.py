"""The docker runner (isolation type `docker`): a container per action through the Docker
Engine API at `isolation.docker_socket`, by the docker SDK (a maintained client, not HTTP
of our own). The same container as the podman runner's: the image from `container-image`
or `default_image`, the slot uid with no capabilities, the exec root at /execroot and TMPDIR
at /tmp, no network unless asked and allowed (then Docker's bridge, which cannot reach the
host's loopback), pids, memory and rlimits from the action's limits.

The Docker API takes no fds, so the spawn helper bound into the container works from files
in a control directory of the action's, never seen by the daemon: the Command's environment
(applied only by the helper's final exec, so no environment of the action's goes through
dockerd, containerd or runc), the status (the container started; the command could not be
executed), and stdout and stderr, written there directly (no log driver copies them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from typing import Any

from engine.errors import FailedPrecondition
from engine.runners import recycle, spawn
from engine.runners.containers import (
    EXEC_ROOT,
    HELPER_IN_CONTAINER,
    NO_NETWORK,
    USER_NETWORK,
    container_prefix,
    cpu_shares,
    image_of,
    network_of,
    nofile_limit,
    user_of,
)
from engine.runners.protocol import RunRequest, RunResult

log = logging.getLogger(__name__)

CTL = "/.stoker/ctl"  # the control directory inside the container
KEPT_ACTION_DIR = "/.stoker/action"  # a kept container's action directory (ctl, stdout...)
API_TIMEOUT_S = 60.0
PULL_TIMEOUT_S = 300.0
IMAGE_CHECK_TTL_S = 60.0


class DockerRunner:
    name = "docker"

    def __init__(self, socket: str, worker: str, *, default_image: str = "",
                 allow_network: bool = False, network_mode: str = "none"):
        import docker

        self.socket = socket
        self.client = docker.DockerClient(base_url=f"unix://{socket}", timeout=API_TIMEOUT_S)
        self.prefix = container_prefix(worker)
        self.default_image = default_image
        self.allow_network = allow_network
        self.network_mode = network_mode  # isolation.network_mode: bridge = network default
        self.nofile = nofile_limit()
        self._images: dict[str, float] = {}
        self.kept = recycle.KeptContainers(
            lambda names: asyncio.to_thread(self._remove_all, names))
        self._waits = concurrent.futures.ThreadPoolExecutor(max_workers=256,
                                                            thread_name_prefix="docker-wait")

    def _ensure_image(self, image: str) -> None:
        import docker.errors

        seen = self._images.get(image)
        if seen is not None and time.monotonic() - seen < IMAGE_CHECK_TTL_S:
            return
        try:
            self.client.images.get(image)
        except docker.errors.ImageNotFound:
            try:
                self.client.images.pull(image)
            except docker.errors.DockerException as e:
                raise FailedPrecondition(f"container image {image!r} is not on this machine "
                                         f"and could not be pulled: {e}") from None
        self._images[image] = time.monotonic()

    def _control_files(self, req: RunRequest, uid: int, gid: int) -> str:
        """The control directory beside stdout: env, status; stdout and stderr made too."""
        ctl = os.path.join(os.path.dirname(req.stdout_path), "docker-ctl")
        # Action directories are reused: a previous action's files go first. Root's and not
        # listable, so the action can replace none of the files in it.
        if os.path.lexists(ctl):
            shutil.rmtree(ctl)
        os.mkdir(ctl, 0o711)
        env = dict(req.env)
        env.setdefault("TMPDIR", "/tmp")
        for path, data in ((os.path.join(ctl, "env"), spawn.env_bytes(env)),
                           (os.path.join(ctl, "status"), b""),
                           (req.stdout_path, b""), (req.stderr_path, b"")):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                os.fchown(fd, uid, gid)
            finally:
                os.close(fd)
        os.chmod(ctl, 0o711)  # mkdir's mode passed the umask
        return ctl

    def _options(self, req: RunRequest, name: str, network: str,
                 binds: list[str]) -> dict[str, Any]:
        """containers.create's options for the action's container (image, command not);
        binds: more SRC:DST:MODE."""
        import docker.types

        uid, gid = user_of(req, self.name)
        pids = req.limits.pids or 4096
        volumes = [f"{spawn.require_helper()}:{HELPER_IN_CONTAINER}:ro",
                   f"{req.exec_root}:{EXEC_ROOT}:rw", f"{req.tmpdir}:/tmp:rw", *binds]
        return dict(
            name=name, user=f"{uid}:{gid}", working_dir=_cwd(req),
            network_mode=network, cap_drop=["ALL"], security_opt=["no-new-privileges"],
            pids_limit=pids, mem_limit=req.limits.memory_bytes or None,
            cpu_shares=cpu_shares(req),
            ulimits=[docker.types.Ulimit(name="nofile", soft=self.nofile, hard=self.nofile),
                     docker.types.Ulimit(name="nproc", soft=pids, hard=pids)],
            volumes=volumes, log_config=docker.types.LogConfig(type="none"),
            environment={}, detach=True)

    def _create(self, req: RunRequest, image: str, name: str, ctl: str) -> Any:
        network = ("bridge" if network_of(req, self.allow_network, self.network_mode)
                   == USER_NETWORK else "none")
        command = [HELPER_IN_CONTAINER, "--env-file", f"{CTL}/env", "--status-file",
                   f"{CTL}/status", "--stdout", "/.stoker/stdout", "--stderr",
                   "/.stoker/stderr", "--report-start", "--cwd", _cwd(req), "--", *req.argv]
        return self.client.containers.create(image, command, **self._options(
            req, name, network, [f"{ctl}:{CTL}:rw", f"{req.stdout_path}:/.stoker/stdout:rw",
                                 f"{req.stderr_path}:/.stoker/stderr:rw"]))

    def _start_kept(self, req: RunRequest, image: str, name: str) -> Any:
        """A kept container: read-only but for its binds (TMPDIR at /var/tmp too, the
        action directory whole, for the control files of each action run in it), holding
        until it is removed."""
        action_dir = os.path.dirname(req.stdout_path)
        container = self.client.containers.create(
            image, [HELPER_IN_CONTAINER, "--in-container", "--hold"], read_only=True,
            **self._options(req, name, "none", [f"{req.tmpdir}:/var/tmp:rw",
                                                 f"{action_dir}:{KEPT_ACTION_DIR}:rw"]))
        try:
            container.start()
            container.reload()
            holder = int(container.attrs.get("State", {}).get("Pid") or 0)
            if holder <= 0:
                raise RuntimeError("the engine names no pid for its pid 1")
        except BaseException:
            self._remove(container)
            raise
        self.kept.started(name, holder)
        return container

    async def run(self, req: RunRequest) -> RunResult:
        image = image_of(req.platform, self.default_image)
        uid, gid = user_of(req, self.name)
        # Refused before anything; an action with a network gets a fresh container.
        kept = (network_of(req, self.allow_network, self.network_mode) == NO_NETWORK
                and recycle.requested(req.platform))
        await asyncio.to_thread(self._ensure_image, image)
        ctl = self._control_files(req, uid, gid)
        try:
            if kept:
                result, status = await self._run_kept(ctl, req, image)
            else:
                result, status = await self._run_in(ctl, req, image, uid)
        finally:
            # The Command's environment (secrets, perhaps) must not outlive the action.
            shutil.rmtree(ctl, ignore_errors=True)
        if not status.startswith("X"):
            raise spawn.SpawnError(f"docker could not start the container (exit "
                                   f"{result.exit_code})")
        command_said = status.partition("\n")[0]
        if command_said[1:2] == "E":
            result.spawn_error = f"cannot execute {req.argv[0]!r}: " \
                                 f"{command_said[2:].partition(' ')[2]}"
        return result

    async def _made(self, make: Callable[[], Any]) -> Any:
        """make() (which makes a container) in a thread; one it makes after the action was
        cancelled is removed, not left for the next worker to find."""
        made = asyncio.get_running_loop().run_in_executor(None, make)
        try:
            return await asyncio.shield(made)
        except asyncio.CancelledError:
            async def undo() -> None:
                try:
                    container = await made
                except Exception:
                    return
                await asyncio.to_thread(self._remove, container)
            await asyncio.shield(undo())
            raise

    async def _run_in(self, ctl: str, req: RunRequest, image: str,
                      uid: int) -> tuple[RunResult, str]:
        name = f"{self.prefix}{uid}-{secrets.token_hex(4)}"
        start = time.time()
        try:
            container = await self._made(lambda: self._create(req, image, name, ctl))
        except FailedPrecondition:
            raise
        except Exception as e:
            raise spawn.SpawnError(f"docker could not create the container: {e}") from e
        try:
            result = await self._run(container, req, start)
        finally:
            await asyncio.shield(asyncio.to_thread(self._remove, container))
        return result, spawn.head_of(os.path.join(ctl, "status"), 4096)

    async def _run_kept(self, ctl: str, req: RunRequest,
                        image: str) -> tuple[RunResult, str]:
        key = recycle.key_of(req, image)
        name = self.kept.take(key)
        if name is not None:
            try:
                return await self._exec_kept(ctl, req, key, name)
            except _NotStarted as e:
                # Gone or broken since its last action, and the action never started in
                # it: drop it and start another (as BuildBuddy does with a runner it cannot
                # unpause). An exec that started and then failed is not run twice.
                log.warning("kept container %s did not take the action (%s): starting "
                            "another", name, e)
        assert req.run_as is not None
        name = f"{self.prefix}{req.run_as[0]}-kept-{secrets.token_hex(4)}"
        try:
            await self._made(lambda: self._start_kept(req, image, name))
        except Exception as e:
            raise spawn.SpawnError(f"docker could not start a kept container: {e}") from e
        return await self._exec_kept(ctl, req, key, name)

    async def _exec_kept(self, ctl: str, req: RunRequest, key: recycle.WarmKey,
                         name: str) -> tuple[RunResult, str]:
        """The action in kept container name: docker exec of the spawn helper with
        --reap-all, the control files in the action directory bound whole."""
        uid, gid = user_of(req, self.name)
        cwd = _cwd(req)
        # All three are in the action directory, which the container has whole.
        assert os.path.dirname(ctl) == os.path.dirname(req.stdout_path) == \
            os.path.dirname(req.stderr_path)
        at = f"{KEPT_ACTION_DIR}/{os.path.basename(ctl)}"
        command = [HELPER_IN_CONTAINER, "--in-container", "--env-file", f"{at}/env",
                   "--status-file", f"{at}/status",
                   "--stdout", f"{KEPT_ACTION_DIR}/{os.path.basename(req.stdout_path)}",
                   "--stderr", f"{KEPT_ACTION_DIR}/{os.path.basename(req.stderr_path)}",
                   "--report-start", "--reap-all",
                   *recycle.CLEAN_CHECKS, "--cwd", cwd, "--", *req.argv]
        api = self.client.api
        clean = False
        try:
            start = time.time()
            try:
                made = await asyncio.to_thread(api.exec_create, name, command,
                                               user=f"{uid}:{gid}", workdir=cwd)
            except Exception as e:
                raise _NotStarted(f"docker could not run the action in kept container "
                                  f"{name}: {e}") from e
            # Attached: the exec's output (which the helper keeps open until it is done,
            # the command's own going to files) ends when everything is done. Not detached
            # and polled: podman's service says a detached exec runs long after it ended.
            waiting = asyncio.get_running_loop().run_in_executor(
                self._waits, functools.partial(api.exec_start, made["Id"]))
            done, _ = await asyncio.wait({waiting},
                                         timeout=req.timeout_s if req.timeout_s > 0 else None)
            timed_out = not done
            if timed_out:
                await asyncio.to_thread(self._remove_named, name)
            output = b""
            try:
                output = await waiting or b""
            except Exception as e:
                if not timed_out:
                    raise spawn.SpawnError(f"kept container {name} went away: {e}") from e
            end = time.time()
            status = spawn.head_of(os.path.join(ctl, "status"), 4096)
            # The verdict comes on the exec's output, which only the helper holds: the
            # status file is the action's uid's to write, so it only says the start.
            code, clean = recycle.after_action(
                output.decode(errors="replace") if isinstance(output, bytes) else "")
            clean = clean and not timed_out and self.kept.only_holder_left(name)
            if code is None:  # the helper died with the command (an OOM kill, a timeout)
                code = 128 + 9
            return RunResult(code, timed_out, start, end, None), status
        finally:
            await self.kept.after(key, name, clean)

    def _remove_all(self, names: list[str]) -> None:
        for name in names:
            self._remove_named(name)

    def _remove_named(self, name: str) -> None:
        self.kept.forget(name)
        try:
            self.client.api.remove_container(name, force=True)
        except Exception:
            pass  # already gone

    async def close(self) -> None:
        """Remove the kept containers (the worker stops)."""
        await self.kept.close()

    async def _run(self, container: Any, req: RunRequest, start: float) -> RunResult:
        try:
            await asyncio.to_thread(container.start)
        except Exception as e:
            raise spawn.SpawnError(f"docker could not start the container: {e}") from e
        # A thread of its own for each wait (as long as the action runs): the loop's default
        # pool is small and shared with everything else the worker hands to threads.
        waiting = asyncio.get_running_loop().run_in_executor(self._waits, container.wait)
        timed_out = False
        try:
            done, _ = await asyncio.wait({waiting},
                                         timeout=req.timeout_s if req.timeout_s > 0 else None)
            if not done:
                timed_out = True
                await asyncio.to_thread(self._kill, container)
            outcome = await waiting
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self._kill, container))
            raise
        end = time.time()
        await asyncio.to_thread(container.reload)
        state = container.attrs.get("State", {})
        return RunResult(int(outcome.get("StatusCode", 1)), timed_out, start, end, None,
                         oom_killed=bool(state.get("OOMKilled")))

    def _kill(self, container: Any) -> None:
        try:
            container.kill()
        except Exception:
            pass  # already gone

    def _remove(self, container: Any) -> None:
        try:
            container.remove(force=True)
        except Exception:
            pass

    async def remove_leftovers(self) -> int:
        """Remove this worker's containers a predecessor left (a killed worker's)."""
        def remove() -> int:
            found = self.client.containers.list(all=True, filters={"name": f"^{self.prefix}"})
            for c in found:
                self._remove(c)
            return len(found)

        return await asyncio.to_thread(remove)


@functools.lru_cache(maxsize=16)  # a machine fact: asked once per process
def probe(socket: str) -> str | None:
    """Why no Docker Engine answers at socket, or None when one does."""
    if spawn.helper_path() is None:
        return "the spawn helper (engine/_spawn) is not installed"
    if not os.path.exists(socket):
        return f"no Docker Engine API at {socket} (isolation.docker_socket)"
    try:
        import docker

        client = docker.DockerClient(base_url=f"unix://{socket}", timeout=10)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as e:
        return f"the Docker Engine API at {socket} does not answer: {e}"
    return None


class _NotStarted(spawn.SpawnError):
    """The action could not even be started in a kept container (its exec not made)."""


def _cwd(req: RunRequest) -> str:
    return os.path.normpath(os.path.join(EXEC_ROOT, req.working_directory))
