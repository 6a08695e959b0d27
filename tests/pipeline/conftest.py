"""An in-process pipeline: a worker's executors (engine/pipeline/compose.py) over a local CAS
in a temporary directory, with no Stoker, server or worker process, so that a test runs an
action in milliseconds:

    def test_something(pipeline_rig):
        outcome = pipeline_rig.run(["/bin/sh", "-c", "echo hi"])
        assert pipeline_rig.read(outcome.result.stdout_digest) == b"hi\\n"

It is composed as engine/worker/process.py's run_worker composes a worker's. As root, each
action runs as a slot uid of its own, claimed from action_uids like a worker's
(identities.claim: never one that another Stoker on this machine holds), under the strongest
containment this process may use; not as root, actions run as our own uid on copies of their
inputs. Unlike a worker's, the rig's actions get no cgroup limits (its cgroups could collide
with those of a Stoker running beside the tests), and the test process never sets
no_new_privs on itself: that would stay set for every later test in the session.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
from google.protobuf import duration_pb2

from engine import digest as digests
from engine.cas.local_disk import LocalDiskStore
from engine.config import Config
from engine.digest import Digest
from engine.pipeline import identities, remove
from engine.pipeline.compose import Pipeline, build_pipeline
from engine.pipeline.identities import Identities
from engine.pipeline.storage import Storage
from engine.proto import re_pb2
from engine.runners import containment, user_network
from engine.runners.bare import BareRunner
from engine.runners.cgroups import ActionCgroups
from engine.runners.select import runners_for
from engine.runners.spawn import SlotNetworks
from engine.task import ActionOutcome, ActionTask
from tests.worker.worker_helpers import FN, Blobs, dg, pb


@dataclass(frozen=True)
class _Host:
    """What a worker finds out about the machine at start; each check starts the spawn
    helper, so the rigs share one answer per session."""

    mechanism: dict[bool, str]  # containment.detect() with and without separate uids
    deny_userns: bool


class PipelineRig:
    """One worker slot's pipeline and its store. Build input trees with .blobs (a
    tests.worker.worker_helpers.Blobs: its blobs go into the store when an action runs),
    then run actions with run() (or execute() on a loop of the test's own)."""

    def __init__(self, base: str, host: _Host, slot: int = 0, mechanism: str | None = None,
                 limits: bool = False, **config):
        """mechanism: a weaker containment than the host's strongest (uid-sweep), to attack
        both paths; limits: per-action cgroups as a worker has them (named after the rig's
        directory, so they collide with no Stoker's)."""
        self.base = base
        config.setdefault("workers", 1)
        config.setdefault("concurrency", 2)
        config.setdefault("data_dir", os.path.join(base, "data"))
        self.config = Config(**config).validated()
        self.store = LocalDiskStore(self.config.cache_dir, self.config.cache_max_bytes)
        self.blobs = Blobs()
        os.makedirs(self.config.build_dir, exist_ok=True)
        os.chmod(self.config.build_dir, 0o711)  # as run_worker: reachable, not listable
        build_root = os.path.join(self.config.build_dir, f"worker-{slot}")
        ids = identities.for_worker(self.config, slot)
        if ids.separate:
            ids = identities.claim(self.config, slot)
        self.identities: Identities = ids
        self.mechanism = (host.mechanism[ids.separate] if ids.separate or ids.shared is not None
                          else containment.SESSION)
        if mechanism is not None:
            self.mechanism = mechanism
        cgroups = ActionCgroups(os.path.basename(base)) if limits else None
        self.cgroups = cgroups
        # Each slot uid keeps its network namespace between actions, as in a worker.
        self.networks = (SlotNetworks(os.path.join(base, "netns"))
                         if self.mechanism == containment.PID_NAMESPACE else None)
        bare = BareRunner(self.mechanism, cgroups, self.config.action_tmp_bytes,
                          deny_userns=host.deny_userns, networks=self.networks,
                          hide=(self.config.data_dir, self.config.build_dir),
                          allow_network=self.config.actions_may_request_network,
                          user_networks=user_network.for_worker(
                              self.config.actions_may_request_network,
                              self.networks.directory if self.networks is not None else None))
        self.bare = bare
        runners = runners_for(self.config, bare, ids.one(), f"test-{slot}")
        self.runners = runners
        self.pipeline: Pipeline = build_pipeline(
            self.config, Storage(local=self.store, remote=None), f"test-{slot}", build_root,
            ids, self.config.slot_capacity(slot), runners)

    def close(self) -> None:
        if self.networks is not None:
            self.networks.release()
        if self.cgroups is not None:
            self.cgroups.remove()
        for fd in self.identities.lock_fds:
            os.close(fd)
        self.identities.lock_fds = []
        self.store.close()

    # ---- building actions ---------------------------------------------------------------

    def put(self, data: bytes) -> Digest:
        """data into the store at once; its digest."""
        d = digests.of_bytes(FN, data)
        self.store.write_bytes(d, data)
        return d

    def read(self, d: re_pb2.Digest) -> bytes:
        return self.store.read_bytes(dg(d))

    def task(self, argv: Sequence[str], *, input_root: Digest | None = None,
             env: dict[str, str] | None = None, output_paths: Sequence[str] = (),
             working_directory: str = "", timeout_s: float | None = None,
             platform: dict[str, str] | None = None, tenant: str = "") -> ActionTask:
        """An ActionTask for argv, its Command, Action and every blob of .blobs in the store.
        input_root defaults to an empty directory."""
        command = re_pb2.Command(arguments=list(argv), output_paths=list(output_paths),
                                 working_directory=working_directory)
        for name, value in sorted((env or {}).items()):
            command.environment_variables.add(name=name, value=value)
        for name, value in sorted((platform or {}).items()):
            command.platform.properties.add(name=name, value=value)
        if input_root is None:
            input_root = self.blobs.directory()
        for d, data in self.blobs.data.items():
            if not self.store.has(d):
                self.store.write_bytes(d, data)
        action = re_pb2.Action(command_digest=pb(self.put(command.SerializeToString())),
                               input_root_digest=pb(input_root))
        if timeout_s is not None:
            action.timeout.CopyFrom(duration_pb2.Duration(
                seconds=int(timeout_s), nanos=int(timeout_s % 1 * 1e9)))
        action_digest = self.put(action.SerializeToString())
        return ActionTask(id=f"task-{action_digest.hash[:12]}", action=action,
                          digest_function=FN,
                          action_digest=f"{action_digest.hash}/{action_digest.size}",
                          tenant=tenant)

    # ---- running them -------------------------------------------------------------------

    async def execute(self, task: ActionTask) -> ActionOutcome:
        return await self.pipeline(task)

    def run(self, argv: Sequence[str], **kwargs) -> ActionOutcome:
        """task(argv, **kwargs) through the pipeline, on a fresh event loop."""
        return asyncio.run(self.execute(self.task(argv, **kwargs)))


@pytest.fixture(scope="session")
def _host() -> _Host:
    return _Host(mechanism={True: containment.detect(True), False: containment.detect(False)},
                 deny_userns=os.geteuid() == 0 and containment.denies_user_namespaces())


@pytest.fixture
def make_pipeline_rig(_host: _Host) -> Iterator[Callable[..., PipelineRig]]:
    """Rigs with Config settings of the test's choosing (run_as="self", say), each in a
    directory of its own; closed and removed after the test."""
    made: list[PipelineRig] = []
    bases: list[str] = []

    def make(**config: object) -> PipelineRig:
        # Under /tmp, not pytest's 0700 tmp_path: action uids must reach their exec roots.
        base = tempfile.mkdtemp(prefix="stoker-pipeline-", dir="/tmp")
        os.chmod(base, 0o755)
        bases.append(base)
        rig = PipelineRig(base, _host, **config)
        made.append(rig)
        return rig

    try:
        yield make
    finally:
        for rig in made:
            rig.close()
        for base in bases:
            remove.remove_tree(base)


@pytest.fixture
def pipeline_rig(make_pipeline_rig: Callable[..., PipelineRig]) -> PipelineRig:
    """A rig with the default settings: as root, run_as auto (a slot uid per action)."""
    return make_pipeline_rig()
