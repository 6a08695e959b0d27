"""RemoteStore: the BlobStore protocol over a remote REAPI CAS (ContentAddressableStorage +
ByteStream), on a synchronous grpc.Channel, plus a bulk upload().

Small blobs go through BatchReadBlobs/BatchUpdateBlobs, large ones through ByteStream.
Capabilities are read once, on first use. Every digest function the server advertises works;
`function` is the one the caller means to use and is checked against them.

upload() is the thread-based twin of engine/cas/uploader.py's AsyncUploader, which the
workers use on their event loop; both share engine/cas/remote_wire.py.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from engine import digest as dg
from engine import hashing
from engine.cas.remote_wire import (
    CHUNK_SIZE,
    BlobFailure,
    CasCapabilities,
    Item,
    RemoteCasError,
    Source,
    UploadError,
    UploadStats,
    batch_base_size,
    batch_entry_size,
    batch_failures,
    by_function,
    check_compress_mode,
    choose_compressors,
    committed_ok,
    digest_pb,
    encode_batch,
    find_missing_requests,
    function_enum,
    open_stream,
    plan_upload,
    read_batch,
    read_resource,
    rpc_reason,
    source_name,
    stream_timeout,
    unique_items,
    upload_resource,
    write_frame,
)
from engine.cas.store import BlobNotFound
from engine.cas.verify import check, check_range, too_long, verify_chunks
from engine.digest import Digest
from engine.proto import bs_grpc, bs_pb2, re_grpc, re_pb2

WRITE_METHOD = "/google.bytestream.ByteStream/Write"
BATCH_UPDATE_METHOD = "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs"
_QUEUE_DEPTH = 4  # frames between a write() caller and gRPC's sending thread


class RemoteStore:
    def __init__(self, channel: grpc.Channel, instance_name: str = "",
                 function: str = dg.SHA256, *, max_batch_bytes: int | None = None,
                 compressors: Iterable[str] | None = None, compress: str = "auto",
                 chunk_size: int = CHUNK_SIZE, max_streams: int = 4, timeout: float = 60.0):
        """compressors: those the client may use (None = all it knows: zstd), used only where
        the server advertises them too. compress: 'auto' compresses a ByteStream upload when
        a sample shrinks by 10 % or more at zstd level 1, 'always', or 'never'. Reads are
        never compressed. max_streams: uploads in flight at once in upload()."""
        if function not in dg.HASH_LENGTH:
            raise ValueError(f"function: unsupported digest function {function!r}")
        if chunk_size <= 0 or max_streams <= 0:
            raise ValueError("chunk_size and max_streams must be positive")
        self.instance_name = instance_name
        self.function = function
        self._max_batch_bytes = max_batch_bytes
        self._wanted = choose_compressors(compressors)
        self._mode = check_compress_mode(compress)
        self._chunk = chunk_size
        self._max_streams = max_streams
        self._timeout = timeout
        self._cas = re_grpc.ContentAddressableStorageStub(channel)
        self._bytestream = bs_grpc.ByteStreamStub(channel)
        self._capabilities_stub = re_grpc.CapabilitiesStub(channel)
        # Write frames and batches are serialized by hand (remote_wire), so these two calls
        # take bytes.
        self._write = channel.stream_unary(WRITE_METHOD, request_serializer=None,
                                           response_deserializer=bs_pb2.WriteResponse.FromString)
        self._batch_update = channel.unary_unary(
            BATCH_UPDATE_METHOD, request_serializer=None,
            response_deserializer=re_pb2.BatchUpdateBlobsResponse.FromString)
        self._caps: CasCapabilities | None = None
        self._caps_lock = threading.Lock()
        self._owned_channel: grpc.Channel | None = None

    @classmethod
    def connect(cls, target: str, **kwargs) -> RemoteStore:
        """A store on its own insecure channel to target (host:port), closed by close()."""
        # Servers may answer ByteStream reads in messages larger than gRPC's 4 MiB default.
        channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", 64 << 20)])
        store = cls(channel, **kwargs)
        store._owned_channel = channel
        return store

    # -- capabilities -------------------------------------------------------------------------

    def capabilities(self) -> CasCapabilities:
        with self._caps_lock:
            if self._caps is None:
                try:
                    reply = self._capabilities_stub.GetCapabilities(
                        re_pb2.GetCapabilitiesRequest(instance_name=self.instance_name),
                        timeout=self._timeout)
                except grpc.RpcError as e:
                    raise RemoteCasError(f"GetCapabilities failed: {rpc_reason(e)}") from e
                caps = CasCapabilities.from_proto(reply)
                caps.check_function(self.function)
                self._caps = caps
            return self._caps

    @property
    def batch_budget(self) -> int:
        return self.capabilities().batch_budget(self._max_batch_bytes)

    @property
    def compressors(self) -> frozenset[str]:
        return self._wanted & self.capabilities().compressors

    def _fits_batch(self, d: Digest) -> bool:
        # The rule plan() applies; BatchReadBlobs answers are sized like the requests.
        base = batch_base_size(self.instance_name, d.function)
        return base + batch_entry_size(d) <= self.batch_budget

    # -- BlobStore ------------------------------------------------------------------------

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        asked = [d for d in dict.fromkeys(digests) if d.size]
        for fn in {d.function for d in asked}:
            self.capabilities().check_function(fn)
        missing: set[Digest] = set()
        for request, known in find_missing_requests(self.instance_name, asked):
            try:
                reply = self._cas.FindMissingBlobs(request, timeout=self._timeout)
            except grpc.RpcError as e:
                raise RemoteCasError(f"FindMissingBlobs failed: {rpc_reason(e)}") from e
            for pb in reply.missing_blob_digests:
                d = known.get((pb.hash, pb.size_bytes))
                if d is None:
                    raise RemoteCasError(f"FindMissingBlobs returned a digest it was not "
                                         f"asked about: {pb.hash}/{pb.size_bytes}")
                missing.add(d)
        return [d for d in asked if d in missing]

    def has(self, digest: Digest) -> bool:
        return not self.find_missing([digest])

    def read_bytes(self, digest: Digest) -> bytes:
        if digest.size == 0:
            return b""
        if self._fits_batch(digest):
            data = self._batch_read(digest)
        else:
            data = b"".join(self._stream_read(digest, 0, 0))
        check(digest, hashing.hash_bytes(digest.function, data), len(data))
        return data

    def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> Iterator[bytes]:
        """The blob's bytes from offset (limit 0 = to the end). A whole-blob read is verified
        against the digest as it ends (DigestMismatch); a range cannot be."""
        check_range(digest, offset, limit)
        return self._read(digest, offset, limit)

    def _read(self, digest: Digest, offset: int, limit: int) -> Iterator[bytes]:
        if digest.size == 0:
            return
        end = digest.size if limit == 0 else min(digest.size, offset + limit)
        if self._fits_batch(digest):
            data = self.read_bytes(digest)
            for start in range(offset, end, self._chunk):
                yield data[start:min(end, start + self._chunk)]
            return
        whole = offset == 0 and end == digest.size
        hasher = hashing.new_hasher(digest.function) if whole else None
        size = 0
        for chunk in self._stream_read(digest, offset, 0 if end == digest.size else end - offset):
            size += len(chunk)
            if hasher is not None:
                hasher.update(chunk)
            yield chunk
        if hasher is not None:
            check(digest, hasher.hexdigest(), size)

    def _batch_read(self, digest: Digest) -> bytes:
        self.capabilities().check_function(digest.function)
        try:
            reply = self._cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
                instance_name=self.instance_name, digests=[digest_pb(digest)],
                digest_function=function_enum(digest.function)), timeout=self._timeout)
        except grpc.RpcError as e:
            raise RemoteCasError(f"BatchReadBlobs of {digest} failed: {rpc_reason(e)}") from e
        for r in reply.responses:
            if (r.digest.hash, r.digest.size_bytes) != (digest.hash, digest.size):
                continue
            if r.status.code == grpc.StatusCode.NOT_FOUND.value[0]:
                raise BlobNotFound(digest)
            if r.status.code != 0:
                raise RemoteCasError(f"BatchReadBlobs of {digest}: status {r.status.code}: "
                                     f"{r.status.message}")
            return r.data
        raise RemoteCasError(f"BatchReadBlobs returned no entry for {digest}")

    def _stream_read(self, digest: Digest, offset: int, limit: int) -> Iterator[bytes]:
        self.capabilities().check_function(digest.function)
        request = bs_pb2.ReadRequest(resource_name=read_resource(self.instance_name, digest),
                                     read_offset=offset, read_limit=limit)
        try:
            for response in self._bytestream.Read(
                    request, timeout=stream_timeout(self._timeout, digest.size)):
                yield response.data
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise BlobNotFound(digest) from None
            raise RemoteCasError(f"ByteStream Read of {digest} failed: {rpc_reason(e)}") from e

    def write_bytes(self, digest: Digest, data: bytes) -> None:
        self.write(digest, (data,))

    def write(self, digest: Digest, chunks: Iterable[bytes]) -> None:
        """Store chunks under digest. The content is verified here as it is sent: a mismatch
        raises DigestMismatch and the server never completes the upload."""
        if digest.size == 0:
            verify_chunks(digest, chunks)
            return
        self.capabilities().check_function(digest.function)
        if self._fits_batch(digest):
            data = verify_chunks(digest, chunks, keep=True)
            failures = self._send_batch((digest.function, [Item(digest, data)]))
            if failures:
                raise RemoteCasError(f"BatchUpdateBlobs of {failures[0]}")
            return
        self._write_verified(digest, chunks)

    def _write_verified(self, digest: Digest, chunks: Iterable[bytes]) -> None:
        """Stream chunks while hashing them in this thread; the final frame (finish_write)
        goes out only once the digest matched. gRPC pulls frames from a small queue."""
        frames: queue.Queue = queue.Queue(_QUEUE_DEPTH)
        call = self._write.future(iter(frames.get, None),
                                  timeout=stream_timeout(self._timeout, digest.size))
        resource = upload_resource(self.instance_name, digest)
        hasher = hashing.new_hasher(digest.function)
        received = 0  # bytes taken from chunks
        offset = 0  # bytes sent
        held: memoryview | None = None  # the last piece, sent with finish_write

        def send(frame: bytes | None) -> None:  # None ends the request stream
            while not call.done():
                try:
                    frames.put(frame, timeout=0.1)
                    return
                except queue.Full:
                    pass

        try:
            for chunk in chunks:
                received += len(chunk)
                if received > digest.size:
                    raise too_long(digest, received)
                hasher.update(chunk)
                view = memoryview(chunk).cast("B")
                for start in range(0, len(view), self._chunk):
                    if held is not None:
                        send(write_frame(held, offset, resource if offset == 0 else ""))
                        offset += len(held)
                    held = view[start:start + self._chunk]
            check(digest, hasher.hexdigest(), received)
            send(write_frame(held, offset, resource if offset == 0 else "", finish=True))
            send(None)
            response = call.result()
        except grpc.RpcError as e:
            raise RemoteCasError(f"ByteStream Write of {digest} failed: {rpc_reason(e)}") from e
        except BaseException:
            call.cancel()
            raise
        finally:
            try:  # never leave gRPC's sending thread blocked on an empty queue
                frames.put_nowait(None)
            except queue.Full:
                pass
        if not committed_ok(digest, None, response.committed_size):
            raise RemoteCasError(f"ByteStream Write of {digest}: the server committed "
                                 f"{response.committed_size} bytes")

    def close(self) -> None:
        """Closes the channel if connect() made it; a caller's channel stays the caller's."""
        if self._owned_channel is not None:
            self._owned_channel.close()
            self._owned_channel = None

    # -- bulk upload ----------------------------------------------------------------------

    def upload(self, items: Iterable[tuple[Digest, Source]]) -> UploadStats:
        """Make every (digest, source) present in the remote CAS; source is a file path or the
        bytes. Digests are trusted (the server verifies). Only what FindMissingBlobs lists is
        sent: batches under the serialized-size budget, the rest over ByteStream, up to
        max_streams calls at once. UploadError names every blob that failed."""
        wanted = unique_items(items)
        stats = UploadStats(blobs=len(wanted))
        caps = self.capabilities()
        for fn in by_function(wanted.values()):
            caps.check_function(fn)
        missing = [wanted[d] for d in self.find_missing(wanted)]
        work = plan_upload(missing, caps, self.instance_name, self.batch_budget, stats)
        failures = work.failures
        jobs: list[Callable[[], bool | list[BlobFailure]]] = [
            functools.partial(self._send_stream, item) for item in work.streams]
        jobs += [functools.partial(self._send_batch, batch) for batch in work.batches]
        with ThreadPoolExecutor(self._max_streams, thread_name_prefix="cas-upload") as pool:
            for result in pool.map(lambda job: job(), jobs):
                if isinstance(result, bool):
                    stats.compressed_streams += result
                else:
                    failures += result
        if failures:
            raise UploadError(failures, len(wanted))
        return stats

    def _send_batch(self, batch: tuple[str, list[Item]]) -> list[BlobFailure]:
        function, items = batch
        entries, sent, failures = read_batch(items)
        if not entries:
            return failures
        request = encode_batch(self.instance_name, function, entries, self.batch_budget)
        try:
            reply = self._batch_update(request, timeout=self._timeout)
        except grpc.RpcError as e:
            reason = f"BatchUpdateBlobs failed: {rpc_reason(e)}"
            return failures + [BlobFailure(i.digest, reason, source_name(i.source))
                               for i in sent]
        return failures + batch_failures(reply, sent)

    def _send_stream(self, item: Item) -> bool | list[BlobFailure]:
        """True/False (compressed or not) when stored, else the failure."""
        d = item.digest
        try:
            stream = open_stream(item, self.instance_name, self._chunk, self.compressors,
                                 self._mode)
        except (OSError, ValueError) as e:
            return [BlobFailure(d, str(e), source_name(item.source))]
        try:
            response = self._write(stream.frames,
                                   timeout=stream_timeout(self._timeout, d.size))
        except grpc.RpcError as e:
            return [BlobFailure(d, f"ByteStream Write failed: {rpc_reason(e)}",
                                source_name(item.source))]
        if not committed_ok(d, stream.compressor, response.committed_size):
            return [BlobFailure(d, f"the server committed {response.committed_size} bytes",
                                source_name(item.source))]
        return stream.compressor is not None
