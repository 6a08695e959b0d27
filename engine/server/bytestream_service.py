"""ByteStream over the CAS: ranged reads, chunked and resumable writes, zstd both ways.

Partial uploads (files under <data>/uploads, for writes in progress and for interrupted
ones kept so the client can resume) are bounded, since a client can start them for free:
- their bytes count against the cache size: the store evicts so that cached blobs plus
  partial uploads stay under max_size_bytes, and partial uploads alone may not exceed it;
- one client may hold at most client_max_bytes of them; a client is the API key its calls
  carry when the endpoint requires keys, else its address whatever its port (reconnecting
  does not reset it; see client_identity);
- an interrupted upload idle for idle_expiry_s is deleted; QueryWriteStatus then says
  committed_size 0 and the client starts again at offset 0, as the ByteStream spec allows
  a server that lost the data;
- at start, leftovers of an earlier run are deleted.
Exceeding a limit, or a full disk (ENOSPC), is RESOURCE_EXHAUSTED for that write, whose
partial file is deleted at once; nothing is published unless complete and verified. Limits
are checked as each chunk lands, so a write may pass one by up to a chunk or two.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import zstandard
from google.rpc import code_pb2

from engine import hashing
from engine.cas.local_disk import LocalDiskStore
from engine.cas.store import BlobNotFound, DigestMismatch
from engine.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StokerError,
)
from engine.proto import bs_grpc, bs_pb2
from engine.server import grpc_errors, resource_names
from engine.server.auth import ApiKeyAuth
from engine.server.cas_service import no_space

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_PARTIAL_UPLOADS = 1000
WRITE_THREADS = 4
# Uploads from this size bypass the page cache (O_DIRECT, whole aligned buffers). Fresh
# page cache is expensive where the host reclaims a VM's free memory (virtio-balloon free
# page reporting): ~340 MB/s to fill new pages vs ~2 GB/s written directly here, and a
# large upload is not read back at once (workers link it and read what actions read).
DIRECT_MIN_BYTES = 16 << 20
DIRECT_BUFFER = 4 << 20
MAX_SPARE_BUFFERS = 8


class OutOfRange(StokerError):
    code = code_pb2.OUT_OF_RANGE


class _Sink:
    """Where an upload's (decompressed) bytes go: hashed on their way into the temp file, so
    finishing needs no second read, and never past the declared size, so a small zstd upload
    cannot inflate into gigabytes before the size check. Used from one thread at a time.

    With a buffer (an mmap of DIRECT_BUFFER bytes, page-aligned), whole buffers are written
    with O_DIRECT and only the tail through the page cache: see DIRECT_MIN_BYTES.
    """

    def __init__(self, fd: int, function: str, limit: int, *, hasher=None, size: int = 0,
                 buffer: mmap.mmap | None = None):
        self.fd = fd
        self.hasher = hasher if hasher is not None else hashing.new_hasher(function)
        self.size = size
        self.allowance = float("inf")  # the size partial-upload limits allow now
        self.allowance_reason = ""
        self._limit = limit
        self._buffer = buffer
        self._view = memoryview(buffer) if buffer is not None else None
        self._fill = 0
        if buffer is not None:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
            except OSError:
                self._buffered()

    def write(self, data) -> int:
        n = len(data)
        if self.size + n > self._limit:
            raise InvalidArgument(f"more data than the {self._limit} bytes the resource name "
                                  "declares")
        if self.size + n > self.allowance:
            # What the limits on partial uploads leave room for: a small zstd frame can
            # decompress to far more than its size, so this is checked as bytes land.
            raise ResourceExhausted(self.allowance_reason)
        self.hasher.update(data)
        self.size += n
        if self._view is None:
            _write_all(self.fd, data)
            return n
        src = memoryview(data)
        while src:
            take = min(len(src), len(self._view) - self._fill)
            self._view[self._fill:self._fill + take] = src[:take]
            self._fill += take
            src = src[take:]
            if self._fill == len(self._view):
                self._drain(self._fill)
        return n

    def _drain(self, n: int) -> None:
        """Write the buffer's first n bytes (a multiple of the page size) directly."""
        view = self._view
        assert view is not None  # only a sink with a buffer fills one
        try:
            _write_all(self.fd, view[:n])
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # The filesystem refused direct I/O after all: nothing of this write landed.
            self._buffered()
            _write_all(self.fd, view[:n])
        self._fill = 0

    def _buffered(self) -> None:
        if self._view is not None:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)

    def flush(self) -> None:
        """Put every byte received so far into the file."""
        if self._view is None or not self._fill:
            return
        aligned = self._fill - self._fill % mmap.PAGESIZE
        tail = bytes(self._view[aligned:self._fill])
        if aligned:
            self._drain(aligned)
        self._fill = 0
        self._buffered()  # the unaligned tail goes through the page cache
        _write_all(self.fd, tail)

    def release(self) -> mmap.mmap | None:
        """Stop buffering; the buffer (for reuse), if there was one."""
        buffer, self._buffer = self._buffer, None
        if self._view is not None:
            self._view.release()
            self._view = None
        return buffer


class _Partial:
    """An upload's file: in progress, or interrupted before finish_write and kept so the
    client can resume it; the hasher has seen exactly the committed bytes, so a resumed
    write need not re-read them."""

    def __init__(self, path: str, client: str):
        self.path = path
        self.client = client
        self.committed = 0
        self.hasher = None
        self.held = 0  # bytes of its file counted against the limits
        self.idle_since = time.monotonic()


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def client_of(peer: str) -> str:
    """A client's address without its port ('ipv4:1.2.3.4:5678' -> 'ipv4:1.2.3.4')."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rpartition(":")[0]
    return peer or "unknown"


def client_identity(peer: str, metadata: Iterable[tuple[str, str | bytes]],
                    keys: ApiKeyAuth | None) -> str:
    """Whose quota a write counts against: the API key that let the call in, named by its
    place in the keys file (never the key), when the endpoint has keys; else the peer's
    address without its port (Bazel opens several connections).

    On a loopback endpoint without keys every local client is one client, 127.0.0.1. An
    action is not among them on a normal root install: it runs in a network namespace of
    its own with only its own loopback (the spawn helper; /statusz action_network), so it
    cannot reach this endpoint at all. Where actions would share the host's network (a
    container without CAP_SYS_ADMIN), `stoker up` refuses to start unless the endpoint has
    keys, which are 0600 and out of an action's reach, so each client has a quota of its
    own, or actions_share_network accepts that an action shares 127.0.0.1's (cli.py).
    Stoker's own workers never count: they write the shared local CAS directly and reach
    the server only over the Bots socket in the data directory, where no ByteStream is
    served (app.py)."""
    if keys is not None:
        index = keys.which(metadata)
        if index is not None:
            return f"API key #{index + 1}"
    return client_of(peer)


class ByteStreamService(bs_grpc.ByteStreamServicer):
    def __init__(self, store: LocalDiskStore, upload_dir: str, *,
                 idle_expiry_s: float = 300.0, client_max_bytes: int = 0,
                 keys: ApiKeyAuth | None = None):
        self._store = store
        self._keys = keys  # the endpoint's API keys: who a client is (client_identity)
        self._upload_dir = upload_dir
        self.idle_expiry_s = idle_expiry_s
        self.client_max_bytes = client_max_bytes
        os.makedirs(upload_dir, mode=0o700, exist_ok=True)
        for name in os.listdir(upload_dir):  # partial uploads do not survive a restart
            path = os.path.join(upload_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                _unlink(path)
        self._partials: dict[str, _Partial] = {}  # interrupted, by resource name
        # Bytes of every partial upload's file, in progress or interrupted: per client, all.
        self._held: dict[str, int] = {}
        self._held_total = 0
        self._evicting = False
        self._tasks: set[asyncio.Task] = set()
        # Chunks are hashed and written here, off the event loop (both release the GIL).
        self._pool = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="bytestream-write")
        self._buffers: list[mmap.mmap] = []
        self._buffers_lock = threading.Lock()

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
        try:
            client = client_identity(context.peer(), context.invocation_metadata() or (),
                                     self._keys)
            return await self._write(request_iterator, client)
        except OSError as e:
            if not no_space(e):
                raise
            # The write's partial file is gone already (see _write's finally).
            raise ResourceExhausted(f"no space left in the local CAS for this upload "
                                    f"({e.strerror or e}); retry later") from None

    async def _write(self, request_iterator, client: str) -> bs_pb2.WriteResponse:
        first = None
        res = None
        partial: _Partial | None = None
        sink: _Sink | None = None
        feed: Callable[[bytes], object] | None = None  # sink.write, or zstd's write into it
        pending: Future | None = None  # the previous chunk, written while the next arrives
        received = 0  # bytes as the client counts them (compressed for compressed-blobs)
        try:
            async for req in self._messages(request_iterator):
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
                        fd = os.open(partial.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                        sink = _Sink(fd, res.digest.function, res.digest.size,
                                     hasher=partial.hasher, size=partial.committed)
                        received = partial.committed
                    else:
                        if partial is not None:
                            self._drop(partial)
                        fd, path = tempfile.mkstemp(dir=self._upload_dir)
                        partial = _Partial(path, client)
                        sink = _Sink(fd, res.digest.function, res.digest.size,
                                     buffer=self._take_buffer(res.digest.size))
                        if req.write_offset != 0:
                            raise InvalidArgument(
                                f"write_offset {req.write_offset}: no upload to resume at "
                                "that offset (it may have expired); QueryWriteStatus, then "
                                "start at 0")
                    feed = sink.write
                    if res.compressor:
                        # zstandard's stubs ask for IO[bytes]; it calls only write().
                        feed = _unzstd(zstandard.ZstdDecompressor().stream_writer(
                            sink, closefd=False))  # type: ignore[arg-type]
                elif req.resource_name and req.resource_name != first.resource_name:
                    raise InvalidArgument("resource_name changed in the middle of a write")
                # The first request set these up (or returned) and they stay set in the loop.
                assert res is not None and partial is not None and sink is not None \
                    and feed is not None
                if req.write_offset != received:
                    raise InvalidArgument(f"write_offset {req.write_offset} does not match the "
                                          f"{received} bytes already written")
                data = req.data  # each access copies the bytes out of the message
                received += len(data)
                if pending is not None:
                    await asyncio.wrap_future(pending)
                    pending = None
                    self._charge(partial, sink.size)
                if data:
                    if res.compressor:
                        self._allow(partial, sink)
                    else:  # reserved before it lands: no limit is passed even for a moment
                        self._charge(partial, sink.size + len(data))
                    pending = self._pool.submit(feed, data)
                partial.committed = received
                if req.finish_write:
                    if pending is not None:
                        await asyncio.wrap_future(pending)
                        pending = None
                        self._charge(partial, sink.size)
                    # Tracked like a chunk: a cancel must not close the file under it.
                    pending = self._pool.submit(sink.flush)
                    await asyncio.wrap_future(pending)
                    pending = None
                    if sink.size != res.digest.size:
                        raise InvalidArgument(f"finish_write after {sink.size} bytes; the "
                                              f"resource name declares {res.digest.size}")
                    actual = sink.hasher.hexdigest()
                    if actual != res.digest.hash:
                        raise InvalidArgument(str(DigestMismatch(res.digest, actual, sink.size)))
                    self._close_sink(sink)
                    sink = None
                    # Verified above, as it arrived: publishing is a rename.
                    await asyncio.to_thread(self._store.insert_file, res.digest,
                                            partial.path, move=True, verify=False)
                    self._drop(partial)  # its bytes are the cache's now
                    partial = None
                    return bs_pb2.WriteResponse(committed_size=received)
            if first is None:
                raise InvalidArgument("empty write stream")
            # Set by the first request; only a finished write (returned above) clears them.
            assert res is not None and partial is not None and sink is not None
            # The stream ended without finish_write: keep what arrived for a resumed write.
            if pending is not None:
                await asyncio.wrap_future(pending)
                pending = None
                self._charge(partial, sink.size)
            if partial is not None and not res.compressor and \
                    len(self._partials) < MAX_PARTIAL_UPLOADS:
                pending = self._pool.submit(sink.flush)
                await asyncio.wrap_future(pending)
                pending = None
                partial.hasher = sink.hasher
                partial.idle_since = time.monotonic()
                older = self._partials.pop(first.resource_name, None)
                if older is not None:  # parked meanwhile by a concurrent write
                    self._drop(older)
                self._partials[first.resource_name] = partial
                partial = None
            raise InvalidArgument("the write stream ended without finish_write")
        finally:
            if pending is not None:
                # The chunk's thread uses the file and buffer: let it finish (a few ms at
                # most) before closing them, even when this call was cancelled.
                wait([pending])
            if sink is not None:
                self._close_sink(sink)
            if partial is not None:
                self._drop(partial)

    # -- accounting of partial uploads (on the event loop only: no locks) -----------------

    def _charge(self, partial: _Partial, size: int) -> None:
        """Count partial's file at size bytes; ResourceExhausted if that passes a limit."""
        grow = size - partial.held
        if grow <= 0:
            return
        mine = self._held.get(partial.client, 0) + grow
        cap = self.client_max_bytes
        # A client's only upload may pass its cap (a blob may be larger than the cap, or
        # even than the cache, as the store allows): the caps bound what piles up.
        if cap and mine > cap and mine - grow > partial.held:
            raise ResourceExhausted(
                f"partial uploads from {partial.client} would hold {mine} bytes, over "
                f"upload_client_max_bytes ({cap}); finish or abandon uploads (an idle one "
                f"is deleted after upload_idle_expiry, {self.idle_expiry_s:g}s)")
        budget = self._store.max_size_bytes
        if budget and self._held_total + grow > budget and self._held_total > partial.held:
            raise ResourceExhausted(
                f"partial uploads would hold {self._held_total + grow} bytes, over the cache "
                f"size they count against (local_cache.max_size_bytes, {budget})")
        self._held[partial.client] = mine
        self._held_total += grow
        partial.held = size
        self._store.reserved_bytes = self._held_total
        if not self._evicting and self._store.over_budget():
            self._evicting = True
            task = asyncio.get_running_loop().create_task(self._evict())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _evict(self) -> None:
        try:
            # Again while it made progress and uploads grew meanwhile (their _charge saw
            # _evicting set and left it to us; nothing runs between this check and the
            # flag's reset).
            while await asyncio.to_thread(self._store.evict) and self._store.over_budget():
                pass
        except Exception:  # noqa: BLE001 - the next chunk tries again
            log.exception("evicting to make room for partial uploads failed")
        finally:
            self._evicting = False

    def _allow(self, partial: _Partial, sink: _Sink) -> None:
        """Let sink grow only as far as the limits leave room for (see _charge)."""
        others = self._held.get(partial.client, 0) - partial.held
        room = float("inf")
        if self.client_max_bytes and others:
            room = min(room, self.client_max_bytes - others - partial.held)
        # Unlike plain bytes, which cost the client their bandwidth, a compressed upload may
        # never hold more than the cache size, even alone: a small zstd frame can expand to
        # whatever size its resource name declares.
        budget = self._store.max_size_bytes
        if budget:
            room = min(room, budget - self._held_total)
        sink.allowance = sink.size + max(0, room)
        sink.allowance_reason = (
            f"a compressed upload from {partial.client} decompresses past what partial uploads "
            f"may hold (upload_client_max_bytes {self.client_max_bytes}, "
            f"local_cache.max_size_bytes {budget})")

    async def _messages(self, request_iterator):
        """The stream's requests; an upload silent for idle_expiry_s is given up (its bytes
        and buffers would otherwise be held for as long as the client keeps it open)."""
        it = request_iterator.__aiter__()
        while True:
            try:
                req = await asyncio.wait_for(it.__anext__(), self.idle_expiry_s)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise DeadlineExceeded(f"no data for {self.idle_expiry_s:g}s "
                                       "(upload_idle_expiry): upload dropped") from None
            yield req

    def _drop(self, partial: _Partial) -> None:
        """Delete partial's file (if still there) and stop counting it."""
        _unlink(partial.path)
        if partial.held:
            left = self._held[partial.client] - partial.held
            if left:
                self._held[partial.client] = left
            else:
                del self._held[partial.client]
            self._held_total -= partial.held
            partial.held = 0
            self._store.reserved_bytes = self._held_total

    def expire_idle(self) -> int:
        """Delete interrupted uploads idle longer than idle_expiry_s; how many went."""
        now = time.monotonic()
        idle = [name for name, p in self._partials.items()
                if now - p.idle_since > self.idle_expiry_s]
        for name in idle:
            self._drop(self._partials.pop(name))
        return len(idle)

    async def expire_forever(self) -> None:
        while True:
            await asyncio.sleep(min(max(self.idle_expiry_s / 4, 0.05), 30.0))
            if n := self.expire_idle():
                log.info("deleted %d partial upload(s) idle for over %gs", n,
                         self.idle_expiry_s)

    def held_bytes(self) -> int:
        return self._held_total

    def _take_buffer(self, size: int) -> mmap.mmap | None:
        if size < DIRECT_MIN_BYTES:
            return None
        with self._buffers_lock:
            if self._buffers:
                return self._buffers.pop()
        return mmap.mmap(-1, DIRECT_BUFFER)

    def _close_sink(self, sink: _Sink) -> None:
        buffer = sink.release()
        os.close(sink.fd)
        if buffer is not None:
            with self._buffers_lock:
                if len(self._buffers) < MAX_SPARE_BUFFERS:
                    self._buffers.append(buffer)
                    return
            buffer.close()

    @grpc_errors.unary
    async def QueryWriteStatus(self, request, context):
        res = resource_names.parse(request.resource_name, write=True)
        if res.digest.is_empty or await asyncio.to_thread(self._store.has, res.digest):
            return bs_pb2.QueryWriteStatusResponse(committed_size=res.digest.size, complete=True)
        partial = self._partials.get(request.resource_name)
        # A query does not count as activity: only bytes written keep an upload alive.
        committed = partial.committed if partial else 0
        return bs_pb2.QueryWriteStatusResponse(committed_size=committed, complete=False)


def _unzstd(writer):
    def feed(data) -> None:
        try:
            writer.write(data)
        except zstandard.ZstdError as e:
            raise InvalidArgument(f"data is not valid zstd: {e}") from None
    return feed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
