"""StageExecutor: an empty exec root with the inputs hardlinked from the local CAS; emptied
for the next action (or removed) once the inner links (run, upload) are done with it."""

from __future__ import annotations

import asyncio
import time

from engine.pipeline.context import ActionContext, Executor
from engine.worker.build_dir import ActionDir, ActionDirPool
from engine.worker.inputs import stage


class StageExecutor:
    def __init__(self, inner: Executor, store, dirs: ActionDirPool):
        self._inner = inner
        self._store = store
        self._dirs = dirs

    async def execute(self, ctx: ActionContext) -> None:
        t0 = time.perf_counter()  # not loop.time(): uvloop's clock is cached per iteration
        action_dir = await asyncio.to_thread(self._stage, ctx)
        ctx.durations["stage"] = time.perf_counter() - t0
        ctx.action_dir = action_dir
        try:
            await self._inner.execute(ctx)
        finally:
            await asyncio.to_thread(self._dirs.release, action_dir)

    def _stage(self, ctx: ActionContext) -> ActionDir:
        action_dir = self._dirs.acquire()
        try:
            stage(ctx.tree, self._store, action_dir.root)
            action_dir.hand_over(ctx.tree.dirs)
            action_dir.prepare_outputs(ctx.command)
            action_dir.working_directory(ctx.command)
            ctx.bytes_staged = sum(f.digest.size for f in ctx.tree.files)
        except BaseException:
            self._dirs.release(action_dir)
            raise
        return action_dir
