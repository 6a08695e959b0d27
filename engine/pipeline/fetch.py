"""FetchExecutor: the Command and the whole input tree, checked, with every blob local.

In embedded mode the server and the workers share one local CAS, so "fetch" only reads and
checks; anything absent is reported as missing inputs (FAILED_PRECONDITION), which makes
the client upload it and retry. Joined to a scheduler, what the local CAS lacks is first
brought down from the scheduler's CAS (the directories in one GetTree, then the files); only
what that CAS lacks too is missing.
"""

from __future__ import annotations

import asyncio

from google.protobuf.message import DecodeError

from engine import digest as dg
from engine.cas.store import BlobNotFound
from engine.errors import InvalidArgument, MissingInputs
from engine.pipeline.context import ActionContext, Executor, stamp
from engine.pipeline.inputs import (
    MAX_COMMAND_BYTES,
    MAX_DIRECTORY_BYTES,
    InputTree,
    MissingBlobs,
    resolve_tree,
)
from engine.pipeline.storage import RemoteCas, Storage
from engine.proto import re_pb2
from engine.sources.protocol import Stage


class FetchExecutor:
    def __init__(self, inner: Executor, storage: Storage):
        self._inner = inner
        self._store = storage.local
        self._remote = storage.remote

    async def execute(self, ctx: ActionContext) -> None:
        ctx.events(Stage.FETCHING)
        start = stamp(ctx.metadata.input_fetch_start_timestamp)
        if self._remote is None:
            await asyncio.to_thread(self._fetch, ctx)
        else:
            await self._fetch_remote(ctx, self._remote)
        ctx.durations["fetch"] = stamp(ctx.metadata.input_fetch_completed_timestamp) - start
        await self._inner.execute(ctx)

    async def _fetch_remote(self, ctx: ActionContext, remote: RemoteCas) -> None:
        fn = ctx.function
        command_digest, root_digest = _digests(ctx)
        instance, auth = ctx.task.instance_name, ctx.task.cache_metadata
        if ctx.task.command is None:
            await remote.fetch_blobs(instance, fn, [command_digest], auth)
        await remote.fetch_tree(instance, fn, root_digest, auth)
        tree, missing = await asyncio.to_thread(self._resolve, ctx)
        if missing:  # files: fetched now, and only now known
            await remote.fetch_blobs(instance, fn, missing, auth)
            if tree is None or ctx.command is None:  # evicted right after it was fetched
                tree, still = await asyncio.to_thread(self._resolve, ctx)
                ctx.cas_hits -= len(missing)
                ctx.cas_misses += len(missing)
            else:
                still = await asyncio.to_thread(self._store.find_missing, missing)
            if still:
                raise MissingInputs(still)
        ctx.tree = tree

    def _fetch(self, ctx: ActionContext) -> None:
        tree, missing = self._resolve(ctx)
        if missing:
            raise MissingInputs(missing)
        ctx.tree = tree

    def _resolve(self, ctx: ActionContext) -> tuple[InputTree | None, list[dg.Digest]]:
        """The Command (into ctx) and the input tree from the local CAS, and every blob it
        lacks: the tree is None when Directories are among them."""
        fn = ctx.function
        command_digest, root_digest = _digests(ctx)
        missing: list[dg.Digest] = []
        if ctx.task.command is not None:  # the scheduler sent it (BuildBuddy)
            ctx.command = ctx.task.command
        else:
            try:
                ctx.command = re_pb2.Command.FromString(self._store.read_bytes(command_digest))
            except BlobNotFound:
                missing.append(command_digest)
            except DecodeError as e:
                raise InvalidArgument(f"Action.command_digest {command_digest} is not a "
                                      f"Command: {e}") from None
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
            return None, missing + e.digests
        blobs = list(tree.blob_digests())
        absent = self._store.find_missing(blobs)
        missing.extend(absent)
        ctx.cas_hits = len(blobs) - len(absent)
        ctx.cas_misses = len(missing)
        return tree, missing


def _digests(ctx: ActionContext) -> tuple[dg.Digest, dg.Digest]:
    action = ctx.task.action
    try:
        command = dg.from_proto(ctx.function, action.command_digest)
        root = dg.from_proto(ctx.function, action.input_root_digest)
    except dg.DigestError as e:
        raise InvalidArgument(f"Action: {e}") from None
    # Before a byte is fetched: both are read whole into memory.
    if command.size > MAX_COMMAND_BYTES and ctx.task.command is None:
        raise InvalidArgument(f"Action.command_digest: the Command is {command.size} bytes, "
                              f"more than the {MAX_COMMAND_BYTES} allowed")
    if root.size > MAX_DIRECTORY_BYTES:
        raise InvalidArgument(f"Action.input_root_digest: the Directory is {root.size} "
                              f"bytes, more than the {MAX_DIRECTORY_BYTES} allowed")
    return command, root
