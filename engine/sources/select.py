"""Picks the work source for a worker: the embedded server's, or the scheduler a joined
executor names in `server` with its `protocol`."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from engine.config import Config
from engine.platform import advertised_platform
from engine.sources.protocol import WorkSource
from engine.sources.results import ResultStore
from engine.task import CallMetadata


def make_source(config: Config, slot: int, name: str, channel: grpc.aio.Channel,
                isolation_types: Sequence[str] = (),
                results: ResultStore | None = None,
                scheduler_metadata: CallMetadata = ()) -> WorkSource:
    """isolation_types: what this worker's runners can run, the default first (BuildBuddy's
    ExecutionNode advertises them); results: where the worker stores results itself, for a
    scheduler that leaves that to its workers (Buildbarn; older BuildBuddy apps);
    scheduler_metadata: what only the scheduler's own calls carry (BuildBuddy's API key,
    where the channel carries none)."""
    properties = advertised_platform(config)
    protocol = config.protocol if config.server else "rwapi"  # embedded: our own Bots service
    target = config.server or "the embedded server"
    if protocol == "rwapi":
        from engine.sources.rwapi import RwapiSource

        return RwapiSource(channel, target=target, bot_id=name,
                           capacity=config.slot_capacity(slot),
                           instance_name=config.instance_name, properties=properties,
                           milli_cpu=config.slot_milli_cpu(slot),
                           memory_bytes=config.slot_memory_bytes(slot))
    if protocol == "buildbuddy":
        from engine.sources.buildbuddy import BuildBuddySource

        return BuildBuddySource(channel, target=target, config=config, slot=slot, name=name,
                                isolation_types=isolation_types or [config.isolation_type],
                                results=results if config.executor_writes_action_cache
                                else None, scheduler_metadata=scheduler_metadata)
    if protocol == "buildbarn":
        from engine.sources.buildbarn import BuildbarnSource

        return BuildbarnSource(channel, target=target, config=config, slot=slot, name=name,
                               properties=properties, results=results)
    raise ValueError(f"protocol: unknown scheduler protocol {protocol!r}")
