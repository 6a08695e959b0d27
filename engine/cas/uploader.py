"""AsyncUploader: pushes outputs to a remote REAPI CAS from a worker's event loop (grpc.aio,
uvloop), the hot path of the upload step.

Why asyncio here: the worker already runs its actions on one uvloop loop, and an upload is
mostly waiting on the server, so several uploads (batches and streams of many actions) share
the loop instead of a thread each. Work that blocks stays off the loop: small files are read
and their batch messages built in a thread; large files are never read at all but mapped
(native.chunks), and each 1 MiB frame costs one copy of the mapped slice.

The sync twin for everything else (and the BlobStore protocol) is engine/cas/remote.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable, Iterator

import grpc

from engine import digest as dg
from engine import hashing
from engine.cas.remote import BATCH_UPDATE_METHOD, WRITE_METHOD
from engine.cas.remote_wire import (
    CHUNK_SIZE,
    BlobFailure,
    CasCapabilities,
    Item,
    RemoteCasError,
    Source,
    UploadError,
    UploadStats,
    batch_failures,
    by_function,
    check_compress_mode,
    choose_compressors,
    committed_ok,
    encode_batch,
    find_missing_requests,
    open_stream,
    plan_upload,
    read_batch,
    rpc_reason,
    source_name,
    stream_timeout,
    unique_items,
)
from engine.digest import Digest
from engine.proto import bs_pb2, re_grpc, re_pb2

# Digest slices for upload_files: small enough that the first upload starts early, large
# enough that FindMissingBlobs and batching still see many blobs at once.
SLICE_BYTES = 64 << 20
SLICE_FILES = 2048


class AsyncUploader:
    def __init__(self, channel: grpc.aio.Channel, instance_name: str = "",
                 function: str = dg.SHA256, *, max_batch_bytes: int | None = None,
                 compressors: Iterable[str] | None = None, compress: str = "auto",
                 chunk_size: int = CHUNK_SIZE, max_in_flight: int = 4,
                 timeout: float = 60.0):
        """The options mean what RemoteStore's do; max_in_flight bounds the batches and
        streams one upload() has on the wire at once."""
        if function not in dg.HASH_LENGTH:
            raise ValueError(f"function: unsupported digest function {function!r}")
        if chunk_size <= 0 or max_in_flight <= 0:
            raise ValueError("chunk_size and max_in_flight must be positive")
        self.instance_name = instance_name
        self.function = function
        self._max_batch_bytes = max_batch_bytes
        self._wanted = choose_compressors(compressors)
        self._mode = check_compress_mode(compress)
        self._chunk = chunk_size
        self._max_in_flight = max_in_flight
        self._timeout = timeout
        self._cas = re_grpc.ContentAddressableStorageStub(channel)
        self._capabilities_stub = re_grpc.CapabilitiesStub(channel)
        self._write = channel.stream_unary(WRITE_METHOD, request_serializer=None,
                                           response_deserializer=bs_pb2.WriteResponse.FromString)
        self._batch_update = channel.unary_unary(
            BATCH_UPDATE_METHOD, request_serializer=None,
            response_deserializer=re_pb2.BatchUpdateBlobsResponse.FromString)
        self._caps: CasCapabilities | None = None
        self._caps_lock = asyncio.Lock()

    async def capabilities(self) -> CasCapabilities:
        async with self._caps_lock:
            if self._caps is None:
                try:
                    reply = await self._capabilities_stub.GetCapabilities(
                        re_pb2.GetCapabilitiesRequest(instance_name=self.instance_name),
                        timeout=self._timeout)
                except grpc.RpcError as e:
                    raise RemoteCasError(f"GetCapabilities failed: {rpc_reason(e)}") from e
                caps = CasCapabilities.from_proto(reply)
                caps.check_function(self.function)
                self._caps = caps
            return self._caps

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        asked = [d for d in dict.fromkeys(digests) if d.size]
        caps = await self.capabilities()
        for fn in {d.function for d in asked}:
            caps.check_function(fn)
        missing: set[Digest] = set()
        for request, known in find_missing_requests(self.instance_name, asked):
            try:
                reply = await self._cas.FindMissingBlobs(request, timeout=self._timeout)
            except grpc.RpcError as e:
                raise RemoteCasError(f"FindMissingBlobs failed: {rpc_reason(e)}") from e
            for pb in reply.missing_blob_digests:
                d = known.get((pb.hash, pb.size_bytes))
                if d is None:
                    raise RemoteCasError(f"FindMissingBlobs returned a digest it was not "
                                         f"asked about: {pb.hash}/{pb.size_bytes}")
                missing.add(d)
        return [d for d in asked if d in missing]

    async def upload(self, items: Iterable[tuple[Digest, Source]]) -> UploadStats:
        """Make every (digest, source) present in the remote CAS; source is a file path or the
        bytes. See RemoteStore.upload: same rules, same UploadError."""
        wanted = unique_items(items)
        stats = UploadStats(blobs=len(wanted))
        caps = await self.capabilities()
        for fn in by_function(wanted.values()):
            caps.check_function(fn)
        missing = [wanted[d] for d in await self.find_missing(wanted)]
        budget = caps.batch_budget(self._max_batch_bytes)
        work = plan_upload(missing, caps, self.instance_name, budget, stats)
        compressors = self._wanted & caps.compressors
        gate = asyncio.Semaphore(self._max_in_flight)

        async def stream(item: Item) -> bool | list[BlobFailure]:
            async with gate:
                return await self._send_stream(item, compressors)

        async def batch(function: str, items: list[Item]) -> list[BlobFailure]:
            async with gate:
                return await self._send_batch(function, items, budget)

        results = await asyncio.gather(*[stream(i) for i in work.streams],
                                       *[batch(fn, b) for fn, b in work.batches])
        failures = work.failures
        for result in results:
            if isinstance(result, bool):
                stats.compressed_streams += result
            else:
                failures += result
        if failures:
            raise UploadError(failures, len(wanted))
        return stats

    async def upload_files(self, paths: list[str], *, slice_bytes: int = SLICE_BYTES,
                           slice_files: int = SLICE_FILES) -> tuple[list[Digest], UploadStats]:
        """Digest the files at paths (with self.function) and make them present remotely;
        returns their digests, in order, and the upload's figures.

        The files are digested in slices (up to slice_files files or slice_bytes bytes) in a
        thread, and each slice's upload starts as soon as it is digested, so the network is
        busy while later outputs are still being hashed. Every slice is awaited before
        returning; the failures of all of them are raised together (UploadError).
        """
        if slice_bytes <= 0 or slice_files <= 0:
            raise ValueError("slice_bytes and slice_files must be positive")
        sizes = await asyncio.to_thread(_sizes, paths)
        digests: list[Digest] = []
        uploads: list[asyncio.Task[UploadStats]] = []
        try:
            for lo, hi in _slices(sizes, slice_bytes, slice_files):
                part = paths[lo:hi]
                done = await asyncio.to_thread(hashing.hash_many, self.function, part)
                found = [Digest(self.function, h, n) for h, n in done]
                digests += found
                items = list(zip(found, part, strict=True))
                uploads.append(asyncio.create_task(self.upload(items)))
            results = await asyncio.gather(*uploads, return_exceptions=True)
        except BaseException:
            for task in uploads:
                task.cancel()
            raise
        stats = UploadStats()
        failures: list[BlobFailure] = []
        for r in results:
            if isinstance(r, UploadError):
                failures += r.failures
            elif isinstance(r, BaseException):
                raise r
            else:
                stats.add(r)
        if failures:
            raise UploadError(failures, len(set(digests)))
        return digests, stats

    async def _send_batch(self, function: str, items: list[Item],
                          budget: int) -> list[BlobFailure]:
        def build() -> tuple[bytes | None, list[Item], list[BlobFailure]]:
            entries, sent, failures = read_batch(items)
            if not entries:
                return None, sent, failures
            return encode_batch(self.instance_name, function, entries, budget), sent, failures

        request, sent, failures = await asyncio.to_thread(build)
        if request is None:
            return failures
        try:
            reply = await self._batch_update(request, timeout=self._timeout)
        except grpc.RpcError as e:
            reason = f"BatchUpdateBlobs failed: {rpc_reason(e)}"
            return failures + [BlobFailure(i.digest, reason, source_name(i.source))
                               for i in sent]
        return failures + batch_failures(reply, sent)

    async def _send_stream(self, item: Item,
                           compressors: frozenset[str]) -> bool | list[BlobFailure]:
        d = item.digest
        try:
            stream = open_stream(item, self.instance_name, self._chunk, compressors, self._mode)
        except (OSError, ValueError) as e:
            return [BlobFailure(d, str(e), source_name(item.source))]
        # Plain frames cost one copy each and are made on the loop; compressing a frame takes
        # milliseconds, so those are made in a thread to keep the loop responsive.
        frames = stream.frames if stream.compressor is None else _in_thread(stream.frames)
        try:
            response = await self._write(frames, timeout=stream_timeout(self._timeout, d.size))
        except grpc.RpcError as e:
            return [BlobFailure(d, f"ByteStream Write failed: {rpc_reason(e)}",
                                source_name(item.source))]
        if not committed_ok(d, stream.compressor, response.committed_size):
            return [BlobFailure(d, f"the server committed {response.committed_size} bytes",
                                source_name(item.source))]
        return stream.compressor is not None


def _sizes(paths: list[str]) -> list[int]:
    return [os.stat(p).st_size for p in paths]


def _slices(sizes: list[int], max_bytes: int, max_files: int) -> Iterator[tuple[int, int]]:
    """(lo, hi) index ranges over sizes, each within max_files files and, unless it is a
    single file, max_bytes bytes."""
    lo, total = 0, 0
    for i, size in enumerate(sizes):
        if i > lo and (i - lo >= max_files or total + size > max_bytes):
            yield lo, i
            lo, total = i, 0
        total += size
    if lo < len(sizes):
        yield lo, len(sizes)


async def _in_thread(frames: Iterator[bytes]) -> AsyncIterator[bytes]:
    while (frame := await asyncio.to_thread(next, frames, None)) is not None:
        yield frame
