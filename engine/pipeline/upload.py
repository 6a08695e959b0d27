"""UploadExecutor: after the command ran (timed out included), puts its outputs, stdout and
stderr into the CAS and fills the ActionResult.

Outputs always go into the shared local CAS first (verified copies, see outputs.py); embedded,
that is the server's CAS. Joined to a scheduler, they then go up to its CAS (what it lacks
only), before the result is reported.

Together, the outputs, stdout and stderr (each inode once, by apparent size) may hold at most
output_limit bytes (action_limits.output_bytes, Config.output_limit_bytes: half the local
cache unless set, never more than all of it) and no more than the cache's disk has free; this
is checked before a byte of them is read (outputs.py), so an action refused for its size
costs milliseconds and evicts nothing.
"""

from __future__ import annotations

from engine import errors
from engine.config import output_limit_bytes
from engine.digest import Digest
from engine.pipeline.context import ActionContext, Executor, in_thread, stamp
from engine.pipeline.outputs import collect_outputs
from engine.pipeline.storage import Storage
from engine.proto import re_pb2


class UploadExecutor:
    def __init__(self, inner: Executor, storage: Storage, output_limit: int | None = None):
        self._inner = inner
        self._store = storage.local
        self._remote = storage.remote
        # None: what Config.output_limit_bytes gives with action_limits.output_bytes unset.
        self.output_limit = (output_limit_bytes(0, self._store.max_size_bytes)
                             if output_limit is None else output_limit)

    async def execute(self, ctx: ActionContext) -> None:
        await self._inner.execute(ctx)
        if ctx.run is None:
            return
        start = stamp(ctx.metadata.output_upload_start_timestamp)
        try:
            blobs = await in_thread(self._upload, ctx)
        except OSError as e:
            if e.errno in errors.NO_SPACE and e.filename is None:
                # A failed write() names no file: every byte here was going into the store.
                where = getattr(self._store, "root", None) or "the CAS"
                raise OSError(e.errno, f"{e.strerror} (writing into the local CAS)",
                              where) from e
            raise
        if self._remote is not None:
            await self._remote.upload(ctx.task.instance_name, ctx.function, blobs,
                                      ctx.task.cache_metadata)
        ctx.durations["upload"] = stamp(ctx.metadata.output_upload_completed_timestamp) - start

    def _upload(self, ctx: ActionContext) -> list[Digest]:
        """Into the local CAS; returns every blob the result refers to."""
        fn = ctx.function
        result = ctx.result
        action_dir = ctx.action_dir
        assert action_dir is not None  # staged before it ran
        action_dir.lock_down()  # before anything is read (build_dir.lock_down)
        outputs = collect_outputs(fn, ctx.command, action_dir.root, self._store,
                                  run_as=action_dir.run_as, limit=self.output_limit,
                                  logs=(action_dir.stdout_path, action_dir.stderr_path))
        stdout, stderr = outputs.logs
        result.stdout_digest.CopyFrom(re_pb2.Digest(hash=stdout.hash, size_bytes=stdout.size))
        result.stderr_digest.CopyFrom(re_pb2.Digest(hash=stderr.hash, size_bytes=stderr.size))
        outputs.fill(result)
        ctx.bytes_uploaded = sum(d.size for d in outputs.blobs)
        return outputs.blobs
