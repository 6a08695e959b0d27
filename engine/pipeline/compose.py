"""The one place that decides the pipeline's order (outermost first):

    Logging → Metrics → Outcome → Metadata → Fetch → Stage → Upload → Run

Logging sees the final status; Metrics counts every action once, whatever its outcome;
Outcome turns raised errors into a status before them;
Metadata's timestamps span the whole execution; Stage's cleanup runs after Upload.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from engine.config import Config
from engine.pipeline.build_dir import ActionDirPool
from engine.pipeline.context import ActionContext, Executor
from engine.pipeline.copy_inputs import CopyInputs
from engine.pipeline.fetch import FetchExecutor
from engine.pipeline.identities import Identities
from engine.pipeline.logging_executor import LoggingExecutor
from engine.pipeline.metadata import MetadataExecutor
from engine.pipeline.metrics_executor import MetricsExecutor
from engine.pipeline.outcome import OutcomeExecutor
from engine.pipeline.run import RunExecutor, Timeouts
from engine.pipeline.stage import StageExecutor
from engine.pipeline.storage import Storage
from engine.pipeline.upload import UploadExecutor
from engine.platform import advertised_platform
from engine.runners.select import RunnerChoice
from engine.sources.protocol import Stage
from engine.task import ActionOutcome, ActionTask, Usage


class Pipeline:
    """Runs one ActionTask through the executors and returns its outcome."""

    def __init__(self, head: Executor, timeouts: Timeouts):
        self._head = head
        self.timeouts = timeouts  # what a reload may change

    async def __call__(self, task: ActionTask,
                       events: Callable[[Stage], None] | None = None) -> ActionOutcome:
        ctx = ActionContext(task=task)
        if events is not None:
            ctx.events = events
        await self._head.execute(ctx)
        return ActionOutcome(result=ctx.result, status=ctx.status, retry=ctx.retry,
                             usage=_usage(ctx))


def _usage(ctx: ActionContext) -> Usage:
    rusage = ctx.run.rusage if ctx.run is not None else None
    return Usage(
        cpu_nanos=int((rusage.ru_utime + rusage.ru_stime) * 1e9) if rusage else 0,
        peak_memory_bytes=rusage.ru_maxrss * 1024 if rusage else 0,  # Linux: KiB
        blobs_fetched=ctx.cas_misses, local_cache_hits=ctx.cas_hits,
        fetch_seconds=ctx.durations.get("fetch", 0.0), bytes_uploaded=ctx.bytes_uploaded,
        upload_seconds=ctx.durations.get("upload", 0.0))


def build_pipeline(config: Config, storage: Storage, worker_name: str, build_root: str,
                   identities: Identities, capacity: int, runners: RunnerChoice) -> Pipeline:
    timeouts = Timeouts(config.default_timeout_s, config.max_timeout_s)
    executor: Executor = RunExecutor(timeouts, runners, config.action_limits(),
                                     advertised_platform(config), config.pool_name)
    store = storage.local
    executor = UploadExecutor(executor, storage, config.output_limit_bytes())
    keep = len(identities.uids) or capacity  # one directory per slot uid
    shares_our_uid = not identities.separate and (identities.shared is None
                                                  or identities.shared[0] == os.geteuid())
    inputs = CopyInputs(store) if shares_our_uid else store
    executor = StageExecutor(executor, inputs, ActionDirPool(build_root, keep=keep), identities)
    executor = FetchExecutor(executor, storage)
    executor = MetadataExecutor(executor, worker_name)
    executor = OutcomeExecutor(executor)
    executor = MetricsExecutor(executor)
    executor = LoggingExecutor(executor)
    return Pipeline(executor, timeouts)
