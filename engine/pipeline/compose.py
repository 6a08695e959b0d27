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
from engine.pipeline.context import ActionContext, Executor
from engine.pipeline.fetch import FetchExecutor
from engine.pipeline.logging_executor import LoggingExecutor
from engine.pipeline.metadata import MetadataExecutor
from engine.pipeline.metrics_executor import MetricsExecutor
from engine.pipeline.outcome import OutcomeExecutor
from engine.pipeline.run import RunExecutor, Timeouts
from engine.pipeline.stage import StageExecutor
from engine.pipeline.upload import UploadExecutor
from engine.task import ActionOutcome, ActionTask
from engine.worker.build_dir import ActionDirPool, RunAs


class Pipeline:
    """Runs one ActionTask through the executors and returns its outcome."""

    def __init__(self, head: Executor, timeouts: Timeouts):
        self._head = head
        self.timeouts = timeouts  # what a reload may change

    async def __call__(self, task: ActionTask,
                       on_command_exit: Callable[[], None] | None = None) -> ActionOutcome:
        ctx = ActionContext(task=task, on_command_exit=on_command_exit)
        await self._head.execute(ctx)
        return ActionOutcome(result=ctx.result, status=ctx.status, retry=ctx.retry)


def build_pipeline(config: Config, store, worker_name: str, build_root: str,
                   run_as: RunAs | None, capacity: int) -> Pipeline:
    timeouts = Timeouts(config.default_timeout_s, config.max_timeout_s)
    executor: Executor = RunExecutor(timeouts)
    executor = UploadExecutor(executor, store)
    executor = StageExecutor(executor, store,
                             ActionDirPool(build_root, run_as, keep=capacity))
    executor = FetchExecutor(executor, store)
    executor = MetadataExecutor(executor, worker_name)
    executor = OutcomeExecutor(executor)
    executor = MetricsExecutor(executor)
    executor = LoggingExecutor(executor)
    return Pipeline(executor, timeouts)


def resolve_run_as(setting: str) -> RunAs | None:
    """'auto': an unprivileged uid when we are root (see build_dir.py), else our own user."""
    import pwd

    if setting == "auto":
        if os.geteuid() != 0:
            return None
        setting = "nobody"
    if setting in ("", "self"):
        return None
    entry = pwd.getpwnam(setting) if not setting.isdigit() else pwd.getpwuid(int(setting))
    return entry.pw_uid, entry.pw_gid
