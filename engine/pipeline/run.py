"""RunExecutor: runs the Command in the runner its platform chooses, under the action's
timeout; every process it started is gone when it returns."""

from __future__ import annotations

import os
from dataclasses import dataclass

from google.rpc import code_pb2

from engine import metrics
from engine.errors import FailedPrecondition
from engine.pipeline.context import ActionContext, stamp
from engine.platform import platform_of, unsatisfied
from engine.runners.protocol import Limits, RunRequest
from engine.runners.select import RunnerChoice
from engine.sources.protocol import Stage


@dataclass
class Timeouts:
    """Shared and mutable: a SIGHUP reload changes them for the actions that follow."""
    default_s: float
    max_s: float


class RunExecutor:
    def __init__(self, timeouts: Timeouts, runners: RunnerChoice, limits: Limits,
                 offered: dict[str, str] | None = None, pool: str = "default"):
        self.timeouts = timeouts
        self.runners = runners
        self.offered = offered or {}  # the executor's platform (engine/sources/select.py)
        self.pool = pool
        self.machine = os.uname().machine
        self.limits = limits

    def timeout_s(self, ctx: ActionContext) -> float:
        action = ctx.task.action
        if action.HasField("timeout") and action.timeout.ToTimedelta().total_seconds() > 0:
            return min(action.timeout.ToTimedelta().total_seconds(), self.timeouts.max_s)
        return self.timeouts.default_s

    async def execute(self, ctx: ActionContext) -> None:
        command = ctx.command
        action_dir = ctx.action_dir
        assert command is not None and action_dir is not None
        platform = platform_of(ctx.task.action, command)
        why = unsatisfied(platform, self.offered, self.pool, self.machine)
        if why is not None:
            raise FailedPrecondition(why)
        runner = self.runners.choose(platform)
        timeout = self.timeout_s(ctx)
        cwd = action_dir.working_directory(command)
        request = RunRequest(
            argv=list(command.arguments),
            env={v.name: v.value for v in command.environment_variables},
            exec_root=action_dir.root,
            working_directory=_relative(cwd, action_dir.root),
            timeout_s=timeout,
            stdout_path=action_dir.stdout_path,
            stderr_path=action_dir.stderr_path,
            tmpdir=action_dir.tmp,
            run_as=action_dir.run_as,
            platform=platform,
            limits=self.limits,
            instance_name=ctx.task.instance_name,
            tenant=ctx.task.tenant,
        )
        ctx.events(Stage.EXECUTING)
        metrics.ACTIONS_RUN.labels(isolation=runner.name).inc()
        start = stamp(ctx.metadata.execution_start_timestamp)
        try:
            result = await runner.run(request)
        finally:
            ctx.durations["run"] = stamp(ctx.metadata.execution_completed_timestamp) - start
        ctx.run = result
        ctx.events(Stage.UPLOADING)  # the command is gone: its run slot is free
        ctx.result.exit_code = result.exit_code
        if result.oom_killed:
            _append(action_dir.stderr_path,
                    f"stoker: the action was killed: it used more than its memory limit of "
                    f"{self.limits.memory_bytes} bytes (action_limits.memory_bytes)\n")
        if result.timed_out:
            ctx.status.code = code_pb2.DEADLINE_EXCEEDED
            ctx.status.message = f"action timed out after {timeout:g}s"


def _relative(path: str, root: str) -> str:
    rel = os.path.relpath(path, os.path.realpath(root))
    return "" if rel == "." else rel


def _append(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
