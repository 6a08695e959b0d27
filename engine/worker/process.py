"""A worker process: pins itself to its CPU set, takes actions from its work source (the
embedded server, or the scheduler it joined) and runs each through the pipeline, up to
`concurrency` at once, on one uvloop event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

import grpc

from engine import heartbeat, logs, reload, status
from engine.cas.local_disk import LocalDiskStore
from engine.config import Config
from engine.pipeline import identities, remove
from engine.pipeline.build_dir import quarantine_dir
from engine.pipeline.compose import build_pipeline
from engine.pipeline.storage import Storage
from engine.platform import advertised_platform
from engine.runners import containment, user_network
from engine.runners.bare import BareRunner
from engine.runners.cgroups import ActionCgroups
from engine.runners.docker import DockerRunner
from engine.runners.podman import PodmanRunner
from engine.runners.select import RunnerChoice, runners_for
from engine.runners.spawn import SlotNetworks
from engine.sources.results import ResultStore
from engine.sources.select import make_source
from engine.worker.loop import EARLY_RELEASE_AFTER_S, EARLY_RELEASE_REMOTE_S, WorkerLoop

log = logging.getLogger(__name__)

# The exit code of a worker whose scheduler stayed unreachable (the supervisor restarts it).
GAVE_UP_EXIT = 3

# How often a worker retries removing what it quarantined.
_PURGE_INTERVAL_S = 600.0


def cpu_set_for(slot: int, workers: int) -> set[int]:
    """Slot N's share of the CPUs this process may use, split as evenly as possible."""
    cpus = sorted(os.sched_getaffinity(0))
    if workers >= len(cpus):
        return {cpus[slot % len(cpus)]}
    per = len(cpus) // workers
    extra = len(cpus) % workers
    start = slot * per + min(slot, extra)
    return set(cpus[start:start + per + (1 if slot < extra else 0)])


async def run_worker(config: Config, slot: int) -> int:
    store = LocalDiskStore(config.cache_dir, config.cache_max_bytes)
    name = f"{socket.gethostname()}-{slot}"
    os.makedirs(config.build_dir, exist_ok=True)
    os.chmod(config.build_dir, 0o711)  # actions reach their own directory; nobody lists them
    build_root = os.path.join(config.build_dir, f"worker-{slot}")
    ids = identities.for_worker(config, slot)
    if ids.separate:
        ids = identities.claim(config, slot)
    # Actions run as Stoker itself (run_as: self) get no namespace: only their session.
    mechanism = (containment.detect(ids.separate) if ids.separate or ids.shared is not None
                 else containment.SESSION)
    if os.geteuid() == 0:
        containment.set_no_new_privs()
    _remove_leftovers(build_root, ids.uids)
    capacity = config.slot_capacity(slot)
    # BuildBuddy: the API key on its scheduler's own calls only; a task's calls carry that
    # task's JWT (as upstream's executor does), so the channels carry no key of their own.
    scoped = bool(config.server) and config.protocol == "buildbuddy"
    channel = _scheduler_channel(config, api_key_on_calls=not scoped)
    cache_channel = _cache_channel(config, channel, api_key_on_calls=not scoped)
    storage = Storage(local=store, remote=_remote_cas(cache_channel, store,
                                                      config.fetch_timeout_s)
                      if config.server else None)
    cgroups = ActionCgroups(f"worker-{slot}") if ids.uids or ids.shared else None
    networks = (SlotNetworks(os.path.join(config.run_dir, f"netns-worker-{slot}"))
                if mechanism == containment.PID_NAMESPACE else None)
    if networks is not None:
        networks.release()  # a killed predecessor's: each slot starts with fresh ones
    bare = BareRunner(mechanism, cgroups, config.action_tmp_bytes,
                      deny_userns=containment.denies_user_namespaces(),
                      networks=networks, hide=(config.data_dir, config.build_dir),
                      allow_network=config.actions_may_request_network,
                      user_networks=user_network.for_worker(
                          config.actions_may_request_network,
                          networks.directory if networks is not None else None))
    # Beating first: probing the runners (bwrap, podman info, the Docker socket) and
    # removing a predecessor's containers can take longer than the supervisor waits for it.
    beat = asyncio.create_task(heartbeat.beat_forever(os.environ.get(heartbeat.ENV)))
    runners = await asyncio.to_thread(runners_for, config, bare, ids.one(), name)
    for kind, why in runners.unavailable.items():
        log.info("isolation type %s is not offered here: %s", kind, why)
    for kind in ("podman", "docker"):
        containers = runners.runners.get(kind)
        if isinstance(containers, (PodmanRunner, DockerRunner)):
            removed = await containers.remove_leftovers()
            if removed:
                log.warning("removed %d %s container(s) a previous worker %s left", removed,
                            kind, name)
    pipeline = build_pipeline(config, storage, name, build_root, ids, capacity, runners)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def apply(new: Config) -> None:
        logs.set_debug(new.debug)
        pipeline.timeouts.default_s = new.default_timeout_s
        pipeline.timeouts.max_s = new.max_timeout_s

    reload.install(loop, config, apply)
    purge = asyncio.create_task(_purge_periodically(build_root))
    source = make_source(config, slot, name, channel, runners.offered(),
                         ResultStore(cache_channel, storage) if config.server else None,
                         _api_key_metadata(config) if scoped else ())
    status_of = _status_writer(config, slot, bare, runners, ids.uids, source.protocol,
                               source.target)
    status_of.write(False)
    worker_loop = WorkerLoop(source, pipeline, capacity, drain_grace_s=config.drain_grace_s,
                             early_release_s=(EARLY_RELEASE_REMOTE_S if config.server
                                              else EARLY_RELEASE_AFTER_S),
                             on_connection=status_of.write, on_refused=status_of.refused)
    log.info("worker %s taking work from %s (%s; %d at once; containment %s%s)", name,
             source.target, source.protocol, capacity, mechanism,
             f", uids {ids.uids[0]}-{ids.uids[-1]}" if ids.uids else "")
    try:
        await worker_loop.run(stop)
    finally:
        for kind in ("podman", "docker"):
            kept = runners.runners.get(kind)
            if isinstance(kept, (PodmanRunner, DockerRunner)):
                await kept.close()  # its kept (recycle-runner) containers
        beat.cancel()
        purge.cancel()
        await channel.close()
        if storage.remote is not None:
            storage.remote.close()
        if cache_channel is not channel:
            await cache_channel.close()
        store.close()
        if networks is not None:
            networks.release()
    log.info("worker %s stopped", name)
    return GAVE_UP_EXIT if worker_loop.gave_up else 0


def _scheduler_channel(config: Config, *, api_key_on_calls: bool) -> grpc.aio.Channel:
    if not config.server:  # the embedded server, over the data dir's unix socket
        return grpc.aio.insecure_channel(config.server_address)
    from engine import transport

    return transport.scheduler_channel(config, api_key_on_calls=api_key_on_calls)


def _api_key_metadata(config: Config):
    from engine import transport

    return transport.api_key_metadata(config)


def _cache_channel(config: Config, scheduler: grpc.aio.Channel, *,
                   api_key_on_calls: bool) -> grpc.aio.Channel:
    if not config.cache_server:
        return scheduler
    from engine import transport

    return transport.cache_channel(config, api_key_on_calls=api_key_on_calls)


def _remote_cas(channel: grpc.aio.Channel, store: LocalDiskStore, timeout_s: float):
    from engine.cas.remote_cas import RemoteCasClient

    return RemoteCasClient(channel, store, timeout_s=timeout_s)


class _StatusWriter:
    """Records this worker's link to the scheduler for the monitor (engine/status.py)."""

    def __init__(self, write: Callable[[bool, str | None], None]):
        self._write = write
        self._connected = False
        self._refused: str | None = None

    def write(self, connected: bool) -> None:
        self._connected = connected
        self._write(connected, self._refused)

    def refused(self, why: str | None) -> None:
        self._refused = why
        self._write(self._connected, why)


def _status_writer(config: Config, slot: int, bare: BareRunner, runners: RunnerChoice,
                   uids: list[int], protocol: str, target: str) -> _StatusWriter:
    uid_range = f"{uids[0]}-{uids[-1]}" if uids else None
    platform = advertised_platform(config)

    def write(connected: bool, refused: str | None) -> None:
        try:
            status.write_status(config.run_dir, f"worker-{slot}", {
                "pid": os.getpid(), "connected": connected, "since": time.time(),
                "scheduler": target, "protocol": protocol,
                # What the scheduler says is wrong with this worker's configuration.
                "scheduler_refused": refused,
                # Exactly what is sent to the scheduler (Buildbarn matches it whole).
                "platform": platform, "containment": bare.mechanism,
                "action_network": _network_status(bare),
                "action_limits": ("memory: "
                                  + (bare.cgroups.mechanism if bare.cgroups else "none")
                                  + "; processes: RLIMIT_NPROC per slot uid"),
                "user_namespaces": "denied (seccomp)" if bare.deny_userns else "allowed",
                "isolation_types": runners.offered(),
                "isolation_types_unavailable": runners.unavailable,
                "action_uids": uid_range})
        except OSError as e:  # the status is informational; leasing goes on
            log.warning("cannot write the worker status file: %s", e)
    return _StatusWriter(write)


def _network_status(bare: BareRunner) -> str:
    if bare.mechanism != containment.PID_NAMESPACE:
        return "the host's"
    if bare.user_networks is not None:
        return "loopback only (own namespace); user-mode (slirp4netns) for actions that ask"
    if bare.allow_network:
        return "loopback only (own namespace); slirp4netns missing: asking actions refused"
    return "loopback only (own namespace)"


def _kill_orphaned_actions(build_root: str) -> int:
    """Actions run in sessions of their own, so they outlive a worker killed with SIGKILL.
    The worker that takes over the slot ends them: any process working under the slot's
    build root is one of them."""
    prefix = os.path.realpath(build_root) + "/"
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd.startswith(prefix):
            try:
                os.killpg(os.getpgid(int(entry)), signal.SIGKILL)
            except OSError:
                pass
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def _remove_leftovers(build_root: str, uids: list[int]) -> None:
    """A worker killed mid-action leaves its actions and exec roots behind; they are ours.
    What cannot be removed is moved aside: an action's tree must never stop a worker from
    starting (that would be a crash loop)."""
    if uids:
        survivors = containment.sweep(uids)
        if survivors:
            raise RuntimeError(f"processes {survivors} of this worker's action uids survive "
                               "SIGKILL")
    if os.path.isdir(build_root):
        killed = _kill_orphaned_actions(build_root)
        if killed:
            log.warning("ended %d process(es) left running by this slot's previous worker",
                        killed)
        try:
            remove.remove_tree(build_root)
        except OSError as e:
            moved = remove.quarantine(build_root, quarantine_dir(build_root))
            log.warning("could not remove %s (%s): moved to %s", build_root, e, moved)
    _purge_quarantine(build_root)


def _purge_quarantine(build_root: str) -> None:
    left = remove.purge_quarantine(quarantine_dir(build_root))
    if left:
        log.warning("%d quarantined tree(s) still cannot be removed: %s", len(left),
                    ", ".join(left[:5]))


async def _purge_periodically(build_root: str) -> None:
    while True:
        await asyncio.sleep(_PURGE_INTERVAL_S)
        await asyncio.to_thread(_purge_quarantine, build_root)


def main(config: Config, slot: int) -> int:
    import uvloop

    os.sched_setaffinity(0, cpu_set_for(slot, config.worker_count))
    return uvloop.run(run_worker(config, slot))
