"""What the container runners (podman, docker) share: which image an action runs in, which
network it gets, as whom it runs, and where things are inside the container."""

from __future__ import annotations

import hashlib
import resource

from engine.errors import FailedPrecondition
from engine.platform import value_of
from engine.runners import cgroups, spawn
from engine.runners.protocol import Platform, RunRequest

EXEC_ROOT = "/execroot"  # the action's exec root inside its container
HELPER_IN_CONTAINER = "/.stoker/spawn"  # the spawn helper, bound read-only
IMAGE_PROPERTY = "container-image"
USER_PROPERTY = "dockerUser"
NO_NETWORK, USER_NETWORK = "none", "user"


def image_of(platform: Platform, default_image: str) -> str:
    """The image an action asks for (container-image, docker:// stripped), or the default."""
    wanted = value_of(platform, IMAGE_PROPERTY)
    if wanted:
        if not wanted.startswith("docker://"):
            raise FailedPrecondition(f"platform property {IMAGE_PROPERTY}={wanted!r}: only "
                                     "docker:// images are supported")
        return wanted[len("docker://"):]
    if not default_image:
        raise FailedPrecondition(f"no platform property {IMAGE_PROPERTY} and no "
                                 "isolation.default_image: which image to run is unknown")
    return default_image


def network_of(req: RunRequest, allowed: bool, default: str = "none") -> str:
    """NO_NETWORK, or USER_NETWORK for an action that asks and may (never the host's), or
    that says nothing where isolation.network_mode (default) is bridge."""
    wanted = spawn.network_requested(req.platform)
    if wanted is None:
        if value_of(req.platform, "dockerNetwork") is None and default == "bridge" and allowed:
            return USER_NETWORK
        return NO_NETWORK
    if not allowed:
        raise FailedPrecondition(f"platform property {wanted}: network access for actions "
                                 "is not allowed on this executor "
                                 "(actions_may_request_network is off)")
    if wanted.lower().endswith("=host"):
        raise FailedPrecondition(f"platform property {wanted}: the host's network is not "
                                 "given to actions (it holds Stoker's loopback listeners); "
                                 "dockerNetwork=bridge gets a network of its own")
    return USER_NETWORK


ROOT_USERS = ("root", "0", "0:0", "root:root")


def user_of(req: RunRequest, kind: str) -> tuple[int, int]:
    """The slot uid and gid the container's processes are on the host, whatever dockerUser
    says (checked here: see root_in_container)."""
    if req.run_as is None:
        raise FailedPrecondition(f"isolation type {kind} needs Stoker to run as root "
                                 "(actions as slot uids)")
    root_in_container(req, kind)
    return req.run_as


def root_in_container(req: RunRequest, kind: str) -> bool:
    """Whether the action asks to be root inside its container (dockerUser: root). podman
    gives it as the slot uid mapped to root by a user namespace of the container's own, so
    it is root only over what the slot uid owns (its exec root and TMPDIR); the cache's
    hardlinked inputs belong to no uid of that namespace. Any other user is refused: without
    a namespace it would not own the exec root, and an image's user name would need its uid
    mapped too."""
    assert req.run_as is not None
    uid, gid = req.run_as
    user = (value_of(req.platform, USER_PROPERTY) or "").strip()
    if not user or user in (str(uid), f"{uid}:{gid}"):
        return False
    if user.lower() in ROOT_USERS:
        if kind != "podman":
            raise FailedPrecondition(
                f"platform property {USER_PROPERTY}={user!r}: root in the container needs a "
                "user namespace of the container's own (root mapped to the action's slot "
                f"uid), which the {kind} runner cannot give; the podman runner can")
        return True
    raise FailedPrecondition(
        f"platform property {USER_PROPERTY}={user!r}: only root (mapped to the action's slot "
        "uid by a user namespace, under podman) or the default (the action's slot uid) are "
        "supported")


def cpu_shares(req: RunRequest) -> int | None:
    """The container's CPU weight from the action's EstimatedCPU (1024 a core)."""
    return cgroups.cpu_shares(req.platform)


def container_prefix(worker: str) -> str:
    """The name prefix of a worker's containers (worker: its data directory and name, so
    another Stoker's are never taken for a killed predecessor's)."""
    return f"stoker-{hashlib.sha256(worker.encode()).hexdigest()[:12]}-"


def nofile_limit() -> int:
    """The open-files limit containers get: this process's hard limit (a container runtime
    without CAP_SYS_RESOURCE cannot raise it), at most 2**20."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return min(hard if hard != resource.RLIM_INFINITY else 1 << 20, 1 << 20)
