"""StageExecutor: an exec root owned by the action's identity, with the inputs hardlinked from
the local CAS; emptied for the next action (or removed) once the inner links (run, upload)
are done with it, and only after every process of the action is gone."""

from __future__ import annotations

import asyncio
import logging
import time

from engine.pipeline.build_dir import ActionDir, ActionDirPool
from engine.pipeline.context import ActionContext, Executor, in_thread
from engine.pipeline.identities import Identities, RunAs
from engine.pipeline.inputs import stage
from engine.runners import containment

log = logging.getLogger(__name__)

# How often a uid whose processes would not die is swept again before it is handed out.
RETIRED_RETRY_S = 30.0


class StageExecutor:
    def __init__(self, inner: Executor, store, dirs: ActionDirPool, identities: Identities):
        self._inner = inner
        self._store = store
        self._dirs = dirs
        self._identities = identities
        self._retired: set[asyncio.Task] = set()

    async def execute(self, ctx: ActionContext) -> None:
        t0 = time.perf_counter()  # not loop.time(): uvloop's clock is cached per iteration
        ident = await self._identities.acquire()
        try:
            action_dir = await in_thread(self._stage, ctx, ident)
        except BaseException:
            self._identities.release(ident)
            raise
        ctx.durations["stage"] = time.perf_counter() - t0
        ctx.action_dir = action_dir
        try:
            await self._inner.execute(ctx)
        finally:
            # A run that did not end normally (cancelled, failed) may have left processes
            # behind: the uid is swept before its directory is touched or handed on.
            sweep = self._identities.separate and ctx.run is None
            reusable = False
            try:
                reusable = await in_thread(self._release, action_dir, sweep)
            finally:
                if reusable:
                    self._identities.release(ident)
                else:
                    self._retire(action_dir, ident)

    def _stage(self, ctx: ActionContext, ident: RunAs | None) -> ActionDir:
        action_dir = self._dirs.acquire(ident)
        try:
            tree = ctx.tree
            assert tree is not None, "staged before it was fetched"
            stage(tree, self._store, action_dir.root)
            action_dir.hand_over(tree.dirs)
            action_dir.prepare_outputs(ctx.command)
            action_dir.working_directory(ctx.command)
            ctx.bytes_staged = sum(f.digest.size for f in tree.files)
        except BaseException:
            self._dirs.release(action_dir)
            raise
        return action_dir

    def _release(self, action_dir: ActionDir, sweep: bool) -> bool:
        """Empty or remove the directory; False when the uid must not be handed out again
        yet (processes of it would not die)."""
        if sweep and action_dir.run_as is not None:
            survivors = containment.sweep([action_dir.run_as[0]])
            if survivors:
                log.error("uid %d set aside: processes %s survived SIGKILL; swept again every "
                          "%gs", action_dir.run_as[0], survivors, RETIRED_RETRY_S)
                return False
        self._dirs.release(action_dir)
        return True

    def _retire(self, action_dir: ActionDir, ident: RunAs | None) -> None:
        """Keep ident out of use until its processes are gone and its directory released."""
        async def retry() -> None:
            while True:
                await asyncio.sleep(RETIRED_RETRY_S)
                try:
                    if await in_thread(self._release, action_dir, True):
                        self._identities.release(ident)
                        log.info("uid %s is back in use", ident[0] if ident else None)
                        return
                except Exception:  # noqa: BLE001 - a sweep may fail for a while (EMFILE)
                    log.exception("sweeping a set-aside uid failed")

        task = asyncio.get_running_loop().create_task(retry())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)
