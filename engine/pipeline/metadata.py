"""MetadataExecutor: the worker's name and start/end timestamps on every result."""

from __future__ import annotations

from engine.pipeline.context import ActionContext, Executor, stamp


class MetadataExecutor:
    def __init__(self, inner: Executor, worker_name: str):
        self._inner = inner
        self._worker_name = worker_name

    async def execute(self, ctx: ActionContext) -> None:
        ctx.metadata.worker = self._worker_name
        start = stamp(ctx.metadata.worker_start_timestamp)
        try:
            await self._inner.execute(ctx)
        finally:
            ctx.durations["total"] = stamp(ctx.metadata.worker_completed_timestamp) - start
