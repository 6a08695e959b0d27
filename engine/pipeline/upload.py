"""UploadExecutor: after the command ran (timed out included), puts its outputs, stdout and
stderr into the CAS and fills the ActionResult.

Embedded mode writes straight into the shared local CAS, which is the server's CAS; joined
mode adds the push to the remote CAS here.
"""

from __future__ import annotations

import asyncio

from engine import digest as dg
from engine.pipeline.context import ActionContext, Executor, stamp
from engine.proto import re_pb2
from engine.worker.outputs import collect_outputs


class UploadExecutor:
    def __init__(self, inner: Executor, store):
        self._inner = inner
        self._store = store

    async def execute(self, ctx: ActionContext) -> None:
        await self._inner.execute(ctx)
        if ctx.run is None:
            return
        start = stamp(ctx.metadata.output_upload_start_timestamp)
        await asyncio.to_thread(self._upload, ctx)
        ctx.durations["upload"] = stamp(ctx.metadata.output_upload_completed_timestamp) - start

    def _upload(self, ctx: ActionContext) -> None:
        fn = ctx.function
        result = ctx.result
        for path, field in ((ctx.action_dir.stdout_path, "stdout_digest"),
                            (ctx.action_dir.stderr_path, "stderr_digest")):
            d = dg.of_file(fn, path)
            if not d.is_empty:
                self._store.insert_file(d, path, move=True, verify=False)
            getattr(result, field).CopyFrom(re_pb2.Digest(hash=d.hash, size_bytes=d.size))
        outputs = collect_outputs(fn, ctx.command, ctx.action_dir.root, self._store)
        result.output_files.extend(outputs.files)
        result.output_directories.extend(outputs.directories)
        result.output_symlinks.extend(outputs.symlinks)
        result.output_file_symlinks.extend(outputs.file_symlinks)
        result.output_directory_symlinks.extend(outputs.directory_symlinks)
