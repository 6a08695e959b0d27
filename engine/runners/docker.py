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
import os
import secrets
import shutil
import time
from typing import Any

from engine.errors import FailedPrecondition
from engine.runners import spawn
from engine.runners.containers import (
    EXEC_ROOT,
    HELPER_IN_CONTAINER,
    USER_NETWORK,
    container_prefix,
    cpu_shares,
    image_of,
    network_of,
    nofile_limit,
    user_of,
)
from engine.runners.protocol import RunRequest, RunResult

CTL = "/.stoker/ctl"  # the control directory inside the container
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

    def _create(self, req: RunRequest, image: str, name: str, ctl: str) -> Any:
        import docker.types

        uid, gid = user_of(req, self.name)
        network = ("bridge" if network_of(req, self.allow_network, self.network_mode)
                   == USER_NETWORK else "none")
        cwd = os.path.normpath(os.path.join(EXEC_ROOT, req.working_directory))
        pids = req.limits.pids or 4096
        command = [HELPER_IN_CONTAINER, "--env-file", f"{CTL}/env", "--status-file",
                   f"{CTL}/status", "--stdout", "/.stoker/stdout", "--stderr",
                   "/.stoker/stderr", "--report-start", "--cwd", cwd, "--", *req.argv]
        volumes = {
            spawn.require_helper(): {"bind": HELPER_IN_CONTAINER, "mode": "ro"},
            req.exec_root: {"bind": EXEC_ROOT, "mode": "rw"},
            req.tmpdir: {"bind": "/tmp", "mode": "rw"},
            ctl: {"bind": CTL, "mode": "rw"},
            req.stdout_path: {"bind": "/.stoker/stdout", "mode": "rw"},
            req.stderr_path: {"bind": "/.stoker/stderr", "mode": "rw"},
        }
        return self.client.containers.create(
            image, command, name=name, user=f"{uid}:{gid}", working_dir=cwd,
            network_mode=network, cap_drop=["ALL"], security_opt=["no-new-privileges"],
            pids_limit=pids, mem_limit=req.limits.memory_bytes or None,
            cpu_shares=cpu_shares(req),
            ulimits=[docker.types.Ulimit(name="nofile", soft=self.nofile, hard=self.nofile),
                     docker.types.Ulimit(name="nproc", soft=pids, hard=pids)],
            volumes=volumes, log_config=docker.types.LogConfig(type="none"),
            environment={}, detach=True)

    async def run(self, req: RunRequest) -> RunResult:
        image = image_of(req.platform, self.default_image)
        uid, gid = user_of(req, self.name)
        network_of(req, self.allow_network, self.network_mode)  # refused before anything
        await asyncio.to_thread(self._ensure_image, image)
        ctl = self._control_files(req, uid, gid)
        try:
            result, status = await self._run_in(ctl, req, image, uid)
        finally:
            # The Command's environment (secrets, perhaps) must not outlive the action.
            shutil.rmtree(ctl, ignore_errors=True)
        if not status.startswith("X"):
            raise spawn.SpawnError(f"docker could not start the container (exit "
                                   f"{result.exit_code})")
        if status[1:2] == "E":
            result.spawn_error = f"cannot execute {req.argv[0]!r}: " \
                                 f"{status[2:].partition(' ')[2]}"
        return result

    async def _run_in(self, ctl: str, req: RunRequest, image: str,
                      uid: int) -> tuple[RunResult, str]:
        name = f"{self.prefix}{uid}-{secrets.token_hex(4)}"
        start = time.time()
        try:
            container = await asyncio.to_thread(self._create, req, image, name, ctl)
        except FailedPrecondition:
            raise
        except Exception as e:
            raise spawn.SpawnError(f"docker could not create the container: {e}") from e
        try:
            result = await self._run(container, req, start)
        finally:
            await asyncio.shield(asyncio.to_thread(self._remove, container))
        return result, spawn.head_of(os.path.join(ctl, "status"), 4096)

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
