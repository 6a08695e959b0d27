"""What the pipeline's executors share about one action while it runs."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, status_pb2

from engine.proto import re_pb2
from engine.sources.protocol import Stage
from engine.task import ActionTask

if TYPE_CHECKING:  # annotations only: these modules import this one
    from engine.pipeline.build_dir import ActionDir
    from engine.pipeline.inputs import InputTree
    from engine.runners.protocol import RunResult

T = TypeVar("T")


@dataclass
class ActionContext:
    task: ActionTask
    command: re_pb2.Command | None = None
    tree: InputTree | None = None  # once fetched
    action_dir: ActionDir | None = None  # once staged
    run: RunResult | None = None  # once run
    result: re_pb2.ActionResult = field(default_factory=re_pb2.ActionResult)
    status: status_pb2.Status = field(default_factory=lambda: status_pb2.Status(code=code_pb2.OK))
    retry: bool = False
    durations: dict[str, float] = field(default_factory=dict)
    # Where the action is, for the scheduler's progress reports and the worker's slots.
    events: Callable[[Stage], None] = lambda stage: None
    # Figures for the metrics (engine/pipeline/metrics_executor.py), set where they are known.
    cas_hits: int = 0  # input blobs the local CAS had
    cas_misses: int = 0  # input blobs it lacked
    bytes_staged: int = 0
    bytes_uploaded: int = 0

    @property
    def metadata(self) -> re_pb2.ExecutedActionMetadata:
        return self.result.execution_metadata

    @property
    def function(self) -> str:
        return self.task.digest_function


class Executor(Protocol):
    """One link of the pipeline: does its part, then (usually) calls the next link.

    Action-level failures are recorded in ctx.status, not raised past OutcomeExecutor."""

    async def execute(self, ctx: ActionContext) -> None: ...


def stamp(ts: timestamp_pb2.Timestamp) -> float:
    ts.GetCurrentTime()
    return ts.seconds + ts.nanos / 1e9


async def in_thread(fn: Callable[..., T], /, *args) -> T:
    """fn(*args) in a worker thread, like asyncio.to_thread, except that a cancel is raised
    only once fn has returned: the thread may be using the action's directory, which the
    caller empties or hands on next."""
    fut = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            try:
                await asyncio.wait([fut])
            except asyncio.CancelledError:
                continue
        raise
