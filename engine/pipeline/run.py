"""RunExecutor: runs the Command in the bare runner, under the action's timeout; every process
it started is gone when it returns."""

from __future__ import annotations

from dataclasses import dataclass

from google.rpc import code_pb2

from engine.pipeline.context import ActionContext, stamp
from engine.sources.protocol import Stage
from engine.worker import runner


@dataclass
class Timeouts:
    """Shared and mutable: a SIGHUP reload changes them for the actions that follow."""
    default_s: float
    max_s: float


class RunExecutor:
    def __init__(self, timeouts: Timeouts, containment: str):
        self.timeouts = timeouts
        self.containment = containment

    def timeout_s(self, ctx: ActionContext) -> float:
        action = ctx.task.action
        if action.HasField("timeout") and action.timeout.ToTimedelta().total_seconds() > 0:
            return min(action.timeout.ToTimedelta().total_seconds(), self.timeouts.max_s)
        return self.timeouts.default_s

    async def execute(self, ctx: ActionContext) -> None:
        command = ctx.command
        action_dir = ctx.action_dir
        timeout = self.timeout_s(ctx)
        request = runner.RunRequest(
            argv=list(command.arguments),
            env={v.name: v.value for v in command.environment_variables},
            cwd=action_dir.working_directory(command),
            timeout_s=timeout,
            stdout_path=action_dir.stdout_path,
            stderr_path=action_dir.stderr_path,
            tmpdir=action_dir.tmp,
            run_as=action_dir.run_as,
            containment=self.containment,
        )
        ctx.events(Stage.EXECUTING)
        start = stamp(ctx.metadata.execution_start_timestamp)
        try:
            result = await runner.run(request)
        finally:
            ctx.durations["run"] = stamp(ctx.metadata.execution_completed_timestamp) - start
        ctx.run = result
        ctx.events(Stage.UPLOADING)  # the command is gone: its run slot is free
        ctx.result.exit_code = result.exit_code
        if result.timed_out:
            ctx.status.code = code_pb2.DEADLINE_EXCEEDED
            ctx.status.message = f"action timed out after {timeout:g}s"
