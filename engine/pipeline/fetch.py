"""FetchExecutor: the Command and the whole input tree, checked, with every blob local.

In embedded mode the server and the workers share one local CAS, so "fetch" only reads and
checks; anything absent is reported as missing inputs (FAILED_PRECONDITION), which makes
the client upload it and retry. A remote CAS fetcher slots in here for joined mode.
"""

from __future__ import annotations

import asyncio

from google.protobuf.message import DecodeError

from engine import digest as dg
from engine.cas.store import BlobNotFound
from engine.errors import InvalidArgument, MissingInputs
from engine.pipeline.context import ActionContext, Executor, stamp
from engine.proto import re_pb2
from engine.worker.inputs import MissingBlobs, resolve_tree


class FetchExecutor:
    def __init__(self, inner: Executor, store):
        self._inner = inner
        self._store = store

    async def execute(self, ctx: ActionContext) -> None:
        start = stamp(ctx.metadata.input_fetch_start_timestamp)
        await asyncio.to_thread(self._fetch, ctx)
        ctx.durations["fetch"] = stamp(ctx.metadata.input_fetch_completed_timestamp) - start
        await self._inner.execute(ctx)

    def _fetch(self, ctx: ActionContext) -> None:
        fn = ctx.function
        action = ctx.task.action
        try:
            command_digest = dg.from_proto(fn, action.command_digest)
            root_digest = dg.from_proto(fn, action.input_root_digest)
        except dg.DigestError as e:
            raise InvalidArgument(f"Action: {e}") from None
        missing: list[dg.Digest] = []
        try:
            ctx.command = re_pb2.Command.FromString(self._store.read_bytes(command_digest))
        except BlobNotFound:
            missing.append(command_digest)
        except DecodeError as e:
            raise InvalidArgument(f"Action.command_digest {command_digest} is not a Command: "
                                  f"{e}") from None
        if ctx.command is not None and not ctx.command.arguments:
            raise InvalidArgument("Command.arguments must not be empty")

        def get_directory(d: dg.Digest) -> bytes | None:
            try:
                return self._store.read_bytes(d)
            except BlobNotFound:
                return None

        # Report every missing blob at once (Command, Directories, files) so the client
        # uploads them all in one round.
        try:
            tree = resolve_tree(fn, root_digest, get_directory)
        except MissingBlobs as e:
            ctx.cas_misses = len(missing) + len(e.digests)
            raise MissingInputs(missing + e.digests) from None
        blobs = list(tree.blob_digests())
        absent = self._store.find_missing(blobs)
        missing.extend(absent)
        ctx.cas_hits = len(blobs) - len(absent)
        ctx.cas_misses = len(missing)
        if missing:
            raise MissingInputs(missing)
        ctx.tree = tree
