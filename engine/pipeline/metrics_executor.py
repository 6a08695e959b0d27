"""MetricsExecutor: counts each action once and records its figures (engine/metrics.py).

It sits outside OutcomeExecutor, so every action is counted as completed whatever its
status; the stage links leave their figures in ctx (durations, bytes, CAS hits)."""

from __future__ import annotations

import time

from engine import metrics
from engine.pipeline.context import ActionContext, Executor


class MetricsExecutor:
    def __init__(self, inner: Executor):
        self._inner = inner

    async def execute(self, ctx: ActionContext) -> None:
        metrics.TASKS_STARTED.inc()
        metrics.IN_FLIGHT.inc()
        t0 = time.perf_counter()
        try:
            await self._inner.execute(ctx)
        finally:
            metrics.TASK_DURATION.observe(time.perf_counter() - t0)
            metrics.IN_FLIGHT.dec()
            metrics.TASKS_COMPLETED.inc()
            record(ctx)


def record(ctx: ActionContext) -> None:
    durations = ctx.durations
    for stage, histogram in metrics.STAGE_HISTOGRAMS.items():
        seconds = durations.get(stage)
        if seconds is not None:
            histogram.observe(seconds)
    # Zero increments are skipped: each update costs a lock and a shared-memory write.
    if ctx.bytes_staged:
        metrics.BYTES_STAGED.inc(ctx.bytes_staged)
    if ctx.bytes_uploaded:
        metrics.BYTES_UPLOADED.inc(ctx.bytes_uploaded)
    if ctx.cas_hits:
        metrics.CAS_HITS.inc(ctx.cas_hits)
    if ctx.cas_misses:
        metrics.CAS_MISSES.inc(ctx.cas_misses)
