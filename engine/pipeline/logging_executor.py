"""LoggingExecutor: one structured line per action, after everything else has run: what ran
(action and command digests), how it ended, and how long each stage took."""

from __future__ import annotations

import logging

from google.rpc import code_pb2

from engine.pipeline.context import ActionContext, Executor

log = logging.getLogger("stoker.action")


class LoggingExecutor:
    def __init__(self, inner: Executor):
        self._inner = inner

    async def execute(self, ctx: ActionContext) -> None:
        try:
            await self._inner.execute(ctx)
        finally:
            d = ctx.task.action.command_digest
            log.info(
                "action done",
                extra={"fields": {
                    "task": ctx.task.id,
                    "action": ctx.task.action_digest,
                    "command": f"{d.hash}/{d.size_bytes}",
                    "status": code_pb2.Code.Name(ctx.status.code),
                    "exit_code": ctx.result.exit_code,
                    "retry": ctx.retry,
                    **{f"{k}_ms": round(v * 1000, 2) for k, v in ctx.durations.items()},
                }},
            )
