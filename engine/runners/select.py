"""Which runner takes an action: the isolation type its platform asks for
(`workload-isolation-type`, as BuildBuddy's clients send it), else the executor's
`isolation.type`. A type this executor cannot run is refused, never run another way."""

from __future__ import annotations

from collections.abc import Mapping

from engine.config import Config
from engine.errors import FailedPrecondition
from engine.platform import value_of
from engine.runners import firecracker
from engine.runners.bare import BareRunner
from engine.runners.docker import DockerRunner
from engine.runners.docker import probe as probe_docker
from engine.runners.podman import PodmanRunner, find_podman
from engine.runners.podman import probe as probe_podman
from engine.runners.protocol import Platform, RunAs, Runner
from engine.runners.sandbox import SandboxRunner, find_bwrap
from engine.runners.sandbox import probe as probe_sandbox
from engine.runners.spawn import helper_path as spawn_helper_path

ISOLATION_PROPERTY = "workload-isolation-type"


class RunnerChoice:
    def __init__(self, runners: Mapping[str, Runner], default: str,
                 unavailable: Mapping[str, str] | None = None):
        self.runners = dict(runners)
        self.unavailable = dict(unavailable or {})  # isolation type -> why not here
        if default not in runners:
            why = self.unavailable.get(default, "no runner for it")
            raise ValueError(f"the default isolation type {default!r} cannot run here: {why}")
        self.default = default

    def offered(self) -> list[str]:
        """The isolation types offered, the default first."""
        return [self.default, *sorted(set(self.runners) - {self.default})]

    def choose(self, platform: Platform) -> Runner:
        wanted = value_of(platform, ISOLATION_PROPERTY) or self.default
        runner = self.runners.get(wanted)
        if runner is None:
            why = self.unavailable.get(wanted)
            raise FailedPrecondition(
                f"platform property {ISOLATION_PROPERTY}={wanted!r}: "
                + (f"not available on this executor: {why}" if why else
                   f"this executor runs {', '.join(sorted(self.runners))} only"))
        return runner


def unbindable_paths(config: Config) -> str | None:
    """Why the container runners cannot bind Stoker's paths, or None. Both bind them as
    SRC:DST[:OPTIONS] strings (the CLI's -v, the Docker API's Binds): a ':' or ',' in a path
    of ours would be read as a separator."""
    return next((f"{what} {path!r} holds ':' or ',', which container binds cannot carry"
                 for what, path in (("build directory", config.build_dir),
                                    ("spawn helper", spawn_helper_path() or ""))
                 if ":" in path or "," in path), None)


def runners_for(config: Config, bare: BareRunner, action_ids: RunAs | None,
                worker: str) -> RunnerChoice:
    """The runners a worker (named worker) offers: the bare runner, and each other one this
    machine can run for actions of action_ids (one of them; None: Stoker's own); the rest are
    refused with the reason."""
    runners: dict[str, Runner] = {BareRunner.name: bare}
    unavailable: dict[str, str] = {}
    bwrap = find_bwrap()
    why = probe_sandbox(bwrap, *(action_ids or (None, None)))
    if why is None and bwrap is not None:
        runners[SandboxRunner.name] = SandboxRunner(bwrap, bare)
    else:
        unavailable[SandboxRunner.name] = why or "unknown"
    unbindable = unbindable_paths(config)
    podman = find_podman()
    why = unbindable or probe_podman(podman)
    if why is None and action_ids is None:
        why = "actions run as Stoker itself (run_as: self, or Stoker not root)"
    if why is None and podman is not None:
        runners[PodmanRunner.name] = PodmanRunner(
            podman, f"{config.data_dir}:{worker}", default_image=config.default_image,
            allow_network=config.actions_may_request_network,
            network_mode=config.network_mode, user_networks=bare.user_networks)
    else:
        unavailable[PodmanRunner.name] = why or "unknown"
    why = unbindable or probe_docker(config.docker_socket)
    if why is None and action_ids is None:
        why = "actions run as Stoker itself (run_as: self, or Stoker not root)"
    if why is None:
        runners[DockerRunner.name] = DockerRunner(
            config.docker_socket, f"{config.data_dir}:{worker}",
            default_image=config.default_image,
            allow_network=config.actions_may_request_network,
            network_mode=config.network_mode)
    else:
        unavailable[DockerRunner.name] = why
    unavailable["firecracker"] = firecracker.why_not(config)
    return RunnerChoice(runners, config.isolation_type, unavailable)
