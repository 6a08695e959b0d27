"""ByteStream over the CAS: ranged reads, chunked and resumable writes, zstd both ways."""

from __future__ import annotations

import asyncio
import os
import tempfile

import zstandard
from google.rpc import code_pb2

from engine.cas.local_disk import LocalDiskStore
from engine.cas.store import BlobNotFound, DigestMismatch
from engine.errors import InvalidArgument, NotFound, StokerError
from engine.proto import bs_grpc, bs_pb2
from engine.server import grpc_errors, resource_names

CHUNK = 1 << 20
MAX_PARTIAL_UPLOADS = 1000


class OutOfRange(StokerError):
    code = code_pb2.OUT_OF_RANGE


class _Bounded:
    """Where decompressed upload bytes go: refuses to grow past the declared size, so a small
    zstd upload cannot inflate into gigabytes of memory or disk before the size check."""

    def __init__(self, f, limit: int):
        self._f = f
        self._limit = limit

    def write(self, data) -> int:
        if self._f.tell() + len(data) > self._limit:
            raise InvalidArgument(f"more data than the {self._limit} bytes the resource name "
                                  "declares")
        return self._f.write(data)


class _Partial:
    """An upload interrupted before finish_write, kept so the client can resume it."""

    def __init__(self, path: str):
        self.path = path
        self.committed = 0


class ByteStreamService(bs_grpc.ByteStreamServicer):
    def __init__(self, store: LocalDiskStore, upload_dir: str):
        self._store = store
        self._upload_dir = upload_dir
        os.makedirs(upload_dir, exist_ok=True)
        for name in os.listdir(upload_dir):  # partial uploads do not survive a restart
            os.unlink(os.path.join(upload_dir, name))
        self._partials: dict[str, _Partial] = {}

    @grpc_errors.streaming
    async def Read(self, request, context):
        res = resource_names.parse(request.resource_name, write=False)
        d = res.digest
        if request.read_offset < 0:
            raise InvalidArgument(f"read_offset {request.read_offset} is negative")
        if request.read_limit < 0:
            raise InvalidArgument(f"read_limit {request.read_limit} is negative")
        if request.read_offset > d.size:
            raise OutOfRange(f"read_offset {request.read_offset} is past the end of {d}")
        if res.compressor and request.read_limit:
            raise InvalidArgument("read_limit must be 0 when reading compressed-blobs")
        if not d.is_empty and not await asyncio.to_thread(self._store.has, d):
            raise NotFound(f"blob {d} not found")
        chunks = self._store.read(d, request.read_offset, request.read_limit)
        compressor = zstandard.ZstdCompressor().compressobj() if res.compressor else None
        while True:
            try:
                chunk = await asyncio.to_thread(next, chunks, None)
            except BlobNotFound:
                raise NotFound(f"blob {d} not found") from None
            if chunk is None:
                break
            if compressor is not None:
                chunk = compressor.compress(chunk)
                if not chunk:
                    continue
            yield bs_pb2.ReadResponse(data=chunk)
        if compressor is not None:
            yield bs_pb2.ReadResponse(data=compressor.flush())

    @grpc_errors.unary
    async def Write(self, request_iterator, context):
        first = None
        res = None
        partial: _Partial | None = None
        f = None
        decompressor = None
        received = 0  # bytes as the client counts them (compressed for compressed-blobs)
        try:
            async for req in request_iterator:
                if first is None:
                    first = req
                    if not req.resource_name:
                        raise InvalidArgument("resource_name is required in the first request")
                    res = resource_names.parse(req.resource_name, write=True)
                    if await asyncio.to_thread(self._store.has, res.digest) or res.digest.is_empty:
                        # Someone already stored it: end early, as the spec allows.
                        return bs_pb2.WriteResponse(
                            committed_size=-1 if res.compressor else res.digest.size)
                    partial = self._partials.pop(req.resource_name, None)
                    if partial is not None and req.write_offset == partial.committed \
                            and not res.compressor:
                        f = open(partial.path, "ab")  # noqa: SIM115 - closed in finally
                        received = partial.committed
                    else:
                        if partial is not None:
                            _unlink(partial.path)
                        fd, path = tempfile.mkstemp(dir=self._upload_dir)
                        f = os.fdopen(fd, "wb")
                        partial = _Partial(path)
                        if req.write_offset != 0:
                            raise InvalidArgument(
                                f"write_offset {req.write_offset}: no upload to resume at "
                                "that offset; start at 0")
                    if res.compressor:
                        decompressor = zstandard.ZstdDecompressor().stream_writer(
                            _Bounded(f, res.digest.size), closefd=False)
                elif req.resource_name and req.resource_name != first.resource_name:
                    raise InvalidArgument("resource_name changed in the middle of a write")
                if req.write_offset != received:
                    raise InvalidArgument(f"write_offset {req.write_offset} does not match the "
                                          f"{received} bytes already written")
                received += len(req.data)
                if decompressor is not None:
                    try:
                        decompressor.write(req.data)
                    except zstandard.ZstdError as e:
                        raise InvalidArgument(f"data is not valid zstd: {e}") from None
                else:
                    f.write(req.data)
                if f.tell() > res.digest.size:
                    raise InvalidArgument(f"more data than the {res.digest.size} bytes the "
                                          "resource name declares")
                partial.committed = received
                if req.finish_write:
                    f.close()
                    size = os.path.getsize(partial.path)
                    if size != res.digest.size:
                        raise InvalidArgument(f"finish_write after {size} bytes; the resource "
                                              f"name declares {res.digest.size}")
                    try:
                        await asyncio.to_thread(self._store.insert_file, res.digest,
                                                partial.path, move=True, verify=True)
                    except DigestMismatch as e:
                        raise InvalidArgument(str(e)) from None
                    _unlink(partial.path)
                    partial = None
                    return bs_pb2.WriteResponse(committed_size=received)
            if first is None:
                raise InvalidArgument("empty write stream")
            # The stream ended without finish_write: keep what arrived for a resumed write.
            if partial is not None and not res.compressor and \
                    len(self._partials) < MAX_PARTIAL_UPLOADS:
                f.close()
                self._partials[first.resource_name] = partial
                partial = None
            raise InvalidArgument("the write stream ended without finish_write")
        finally:
            if f is not None and not f.closed:
                f.close()
            if partial is not None:
                _unlink(partial.path)

    @grpc_errors.unary
    async def QueryWriteStatus(self, request, context):
        res = resource_names.parse(request.resource_name, write=True)
        if res.digest.is_empty or await asyncio.to_thread(self._store.has, res.digest):
            return bs_pb2.QueryWriteStatusResponse(committed_size=res.digest.size, complete=True)
        partial = self._partials.get(request.resource_name)
        committed = partial.committed if partial else 0
        return bs_pb2.QueryWriteStatusResponse(committed_size=committed, complete=False)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
