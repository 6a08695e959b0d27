"""ContentAddressableStorage: FindMissingBlobs, batch reads and writes, GetTree."""

from __future__ import annotations

import asyncio
import errno

from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from engine import digest as dg
from engine.cas.index import IndexFull
from engine.cas.store import BlobNotFound, BlobStore, DigestMismatch
from engine.errors import InvalidArgument, NotFound
from engine.proto import re_grpc, re_pb2
from engine.server import grpc_errors
from engine.server.capabilities_service import MAX_BATCH_TOTAL_SIZE_BYTES

DEFAULT_TREE_PAGE = 1000
MAX_TREE_PAGE = 10_000


def request_function(request) -> str:
    try:
        return dg.function_from_enum(request.digest_function)
    except dg.DigestError as e:
        raise InvalidArgument(f"digest_function: {e}") from None


def parse_digest(function: str, pb, field: str) -> dg.Digest:
    try:
        return dg.from_proto(function, pb)
    except dg.DigestError as e:
        raise InvalidArgument(f"{field}: {e}") from None


def _status(code: int, message: str = "") -> status_pb2.Status:
    return status_pb2.Status(code=code, message=message)


def no_space(e: BaseException) -> bool:
    # IndexFull (an OSError) too: the store cannot take another blob until some go.
    return isinstance(e, IndexFull) or (
        isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))


def _write_one(store: BlobStore, d: dg.Digest, data: bytes) -> Exception | None:
    try:
        store.write_bytes(d, data)
    except DigestMismatch as e:
        return e
    except OSError as e:
        if not no_space(e):
            raise
        return e
    return None


class CasService(re_grpc.ContentAddressableStorageServicer):
    def __init__(self, store: BlobStore):
        self._store = store

    @grpc_errors.unary
    async def FindMissingBlobs(self, request, context):
        fn = request_function(request)
        digests = [parse_digest(fn, d, f"blob_digests[{i}]")
                   for i, d in enumerate(request.blob_digests)]
        missing = await asyncio.to_thread(self._store.find_missing, digests)
        return re_pb2.FindMissingBlobsResponse(
            missing_blob_digests=[re_pb2.Digest(hash=d.hash, size_bytes=d.size) for d in missing])

    @grpc_errors.unary
    async def BatchUpdateBlobs(self, request, context):
        fn = request_function(request)
        total = sum(len(r.data) for r in request.requests)
        if total > MAX_BATCH_TOTAL_SIZE_BYTES:
            raise InvalidArgument(
                f"requests: {total} bytes of blobs exceed max_batch_total_size_bytes "
                f"{MAX_BATCH_TOTAL_SIZE_BYTES}; send large blobs through ByteStream")
        return await asyncio.to_thread(self._batch_update, fn, request)

    def _batch_update(self, fn, request) -> re_pb2.BatchUpdateBlobsResponse:
        response = re_pb2.BatchUpdateBlobsResponse()
        entries = []
        blobs: list[tuple[dg.Digest, bytes]] = []
        for i, item in enumerate(request.requests):
            entry = response.responses.add(digest=item.digest)
            try:
                d = parse_digest(fn, item.digest, f"requests[{i}].digest")
                if item.compressor != re_pb2.Compressor.IDENTITY:
                    raise InvalidArgument(f"requests[{i}].compressor {item.compressor} is not "
                                          "supported in batches")
                if len(item.data) != d.size:
                    raise InvalidArgument(f"requests[{i}]: data is {len(item.data)} bytes but "
                                          f"the digest says {d.size}")
            except InvalidArgument as e:
                entry.status.code = code_pb2.INVALID_ARGUMENT
                entry.status.message = e.message
                continue
            entries.append((i, entry))
            blobs.append((d, item.data))
        write_many = getattr(self._store, "write_many", None)
        errors = None
        if write_many is not None:
            try:
                errors = write_many(blobs)
            except OSError as e:
                # Out of space while publishing: find out blob by blob what got in.
                if not no_space(e):
                    raise
        if errors is None:
            errors = [_write_one(self._store, d, data) for d, data in blobs]
        for (i, entry), error in zip(entries, errors, strict=True):
            if error is None:
                entry.status.code = code_pb2.OK
            elif isinstance(error, (DigestMismatch, dg.DigestError)):
                entry.status.code = code_pb2.INVALID_ARGUMENT
                entry.status.message = f"requests[{i}]: {error}"
            elif no_space(error):
                # This blob's status, not the batch's: the others may have been stored.
                entry.status.code = code_pb2.RESOURCE_EXHAUSTED
                entry.status.message = (f"requests[{i}]: no space left to store the blob "
                                        f"({getattr(error, 'strerror', None) or error}); "
                                        "retry later")
            else:
                raise error
        return response

    @grpc_errors.unary
    async def BatchReadBlobs(self, request, context):
        fn = request_function(request)
        digests = [parse_digest(fn, d, f"digests[{i}]") for i, d in enumerate(request.digests)]
        total = sum(d.size for d in digests)
        if total > MAX_BATCH_TOTAL_SIZE_BYTES:
            raise InvalidArgument(
                f"digests: {total} bytes requested exceed max_batch_total_size_bytes "
                f"{MAX_BATCH_TOTAL_SIZE_BYTES}; read large blobs through ByteStream")
        for i, c in enumerate(request.acceptable_compressors):
            if c not in (re_pb2.Compressor.IDENTITY, re_pb2.Compressor.ZSTD):
                raise InvalidArgument(f"acceptable_compressors[{i}]: unknown compressor {c}")
        return await asyncio.to_thread(self._batch_read, digests)

    def _batch_read(self, digests: list[dg.Digest]) -> re_pb2.BatchReadBlobsResponse:
        response = re_pb2.BatchReadBlobsResponse()
        for d in digests:
            entry = response.responses.add(digest=re_pb2.Digest(hash=d.hash, size_bytes=d.size))
            try:
                entry.data = self._store.read_bytes(d)
                entry.status.CopyFrom(_status(code_pb2.OK))
            except BlobNotFound:
                entry.status.CopyFrom(_status(code_pb2.NOT_FOUND, f"blob {d} not found"))
        return response

    @grpc_errors.streaming
    async def GetTree(self, request, context):
        fn = request_function(request)
        root = parse_digest(fn, request.root_digest, "root_digest")
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        page_size = min(request.page_size or DEFAULT_TREE_PAGE, MAX_TREE_PAGE)
        start = 0
        if request.page_token:
            if not request.page_token.isdigit():
                raise InvalidArgument(f"page_token {request.page_token!r} is not one this "
                                      "server issued")
            start = int(request.page_token)
        directories = await asyncio.to_thread(self._walk, fn, root)
        if not directories and start == 0:
            raise NotFound(f"root_digest {root} is not in the CAS")
        # One request returns every remaining page; page_token resumes a broken stream.
        offset = start
        while True:
            page = directories[offset:offset + page_size]
            offset += len(page)
            token = str(offset) if offset < len(directories) else ""
            yield re_pb2.GetTreeResponse(directories=page, next_page_token=token)
            if not token:
                return

    def _walk(self, fn: str, root: dg.Digest) -> list[re_pb2.Directory]:
        """Every Directory reachable from root, breadth first, each digest once. Missing
        parts are left out, as the spec allows."""
        out: list[re_pb2.Directory] = []
        seen = {root}
        pending = [root]
        while pending:
            nxt: list[dg.Digest] = []
            for d in pending:
                try:
                    directory = re_pb2.Directory.FromString(self._store.read_bytes(d))
                except (BlobNotFound, DecodeError):
                    continue
                out.append(directory)
                for child in directory.directories:
                    try:
                        cd = dg.from_proto(fn, child.digest)
                    except dg.DigestError:
                        continue
                    if cd not in seen:
                        seen.add(cd)
                        nxt.append(cd)
            pending = nxt
        return out

