"""RemoteFetcher: brings an action's inputs from a remote REAPI CAS (the scheduler's, in joined
mode) into the machine's shared LocalDiskStore, from which staging hardlinks them.

Each blob is downloaded once per machine however many worker processes want it at once:
every download holds LocalDiskStore.fetch_lock for its digests and re-checks has() under
it, so a process that waited finds the blob there. Nothing becomes visible in the store
before it matched its digest (LocalDiskStore.write / write_many stage to tmp/, verify,
then rename), so a corrupt, short or interrupted download leaves nothing behind.

Small blobs go through BatchReadBlobs, packed within the server's max_batch_total_size_bytes
(remote_wire.plan); larger ones through ByteStream Read, written to disk chunk by chunk as
they arrive. Up to max_in_flight calls run at once.

Threads: the gRPC calls run on the caller's event loop (grpc.aio); whatever blocks (the
fetch locks, which wait for other processes, and the hashing and writing) runs in this
fetcher's own pool, so that lock waits never starve the loop's default executor. A pool
thread holds the locks for a whole download and asks the loop for each response in turn
(_Bridge); this is what lets LocalDiskStore.write consume a stream straight off the wire.

A Read that breaks off is resumed where it stopped (_ResumedRead).

Errors: a blob the remote lacks is MissingInputs (FAILED_PRECONDITION with a MISSING
violation per blob, so the client uploads it again); a failed call or content that does not
match its digest is FetchUnavailable, which the scheduler should retry elsewhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from engine import digest as dg
from engine import hashing
from engine.cas.index import entry_key
from engine.cas.local_disk import LocalDiskStore
from engine.cas.remote_wire import (
    CasCapabilities,
    Item,
    RemoteCasError,
    digest_pb,
    function_enum,
    plan,
    read_resource,
    rpc_reason,
    stream_timeout,
)
from engine.cas.store import BlobNotFound, DigestMismatch
from engine.digest import Digest
from engine.errors import InvalidArgument, MissingInputs, ResourceExhausted, Unavailable
from engine.pipeline.inputs import (
    DEFAULT_MAX_ENTRIES,
    MAX_DEPTH,
    MAX_DIRECTORY_BYTES,
    MAX_DIRECTORY_ENTRIES,
)
from engine.proto import bs_grpc, bs_pb2, re_grpc, re_pb2

Metadata = tuple[tuple[str, str | bytes], ...]
# Directories from GetTree under the digest of their re-serialized bytes: (bytes, message).
_Tree = dict[Digest, tuple[bytes, re_pb2.Directory]]
T = TypeVar("T")
log = logging.getLogger(__name__)

_NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
# GetTree calls (pages) asked for one tree at most; past them the walk reads by digest.
_MAX_TREE_CALLS = 1000
_MAX_BATCH_BLOBS = 256  # blobs per BatchReadBlobs: see fetch_blobs


class FetchUnavailable(Unavailable, RemoteCasError):
    """The remote CAS could not deliver some blobs (a failed or broken call, a timeout, or
    content that does not match its digest). Nothing partial was stored; another attempt,
    on this worker or another, may well succeed: the scheduler should retry the action."""

    retryable = True

    def __init__(self, message: str, digests: list[Digest] | tuple[Digest, ...] = ()):
        super().__init__(message)
        self.digests = list(digests)


class CorruptRemoteBlob(FetchUnavailable):
    """The remote served content that does not hash to the digest asked for."""


@dataclass
class FetchStats:
    blobs: int = 0  # distinct non-empty blobs asked for
    fetched: int = 0  # of those, downloaded by this call
    bytes: int = 0  # their bytes
    local: int = 0  # already in the local store when asked for
    shared: int = 0  # fetched meanwhile by another process (or call), found under the lock
    batches: int = 0  # BatchReadBlobs calls
    streams: int = 0  # blobs read by ByteStream
    resumed: int = 0  # of their Reads, those that went on from where a broken one stopped

    def add(self, other: FetchStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class _Outcome:
    """What one batch or stream did; failures of single blobs are collected, not raised,
    so that one call reports every blob the remote lacks."""

    stats: FetchStats = field(default_factory=FetchStats)
    missing: list[Digest] = field(default_factory=list)
    corrupt: list[Digest] = field(default_factory=list)


class _RemoteNotFound(Exception):
    pass


class _StreamBroken(Exception):
    """A ByteStream Read that broke off (or went quiet) in a way a new Read may get past."""

    def __init__(self, message: str, *, stalled: bool = False):
        super().__init__(message)
        self.stalled = stalled


# What a new Read from the offset reached may get past: a server restarting or going away
# (UNAVAILABLE), a reset stream (INTERNAL), an overloaded or aborted call, a deadline.
# Bazel's remote retrier retries the same codes and resumes downloads at the bytes received.
_RESUMABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})
# Reads in a row that broke before bringing a byte; each waits twice the one before (3.1 s
# in all: a CAS server restarting is back by then).
_MAX_BARREN_READS = 5
_FIRST_BACKOFF_S = 0.1
# Reads of one blob that went quiet for a timeout and were read on: once (a connection that
# died without a word); a server that keeps stalling costs a timeout each, so no more.
_MAX_STALLS = 1
# Reads of one blob at most (a server that sends a little and breaks every time).
_MAX_READS = 64


class _Bridge:
    """Lets a pool thread run coroutines on the loop, one at a time, and lets the loop side
    abandon the thread's work: the coroutine in flight is cancelled and later calls raise."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._current: concurrent.futures.Future | None = None
        self.cancelled = False

    def check(self) -> None:
        if self.cancelled:
            raise concurrent.futures.CancelledError()

    def call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args) -> T:
        self.check()
        fut = asyncio.run_coroutine_threadsafe(fn(*args), self._loop)
        with self._lock:
            self._current = fut
            if self.cancelled:
                fut.cancel()
        try:
            return fut.result()
        finally:
            with self._lock:
                self._current = None

    def call_soon(self, fn: Callable[[], object]) -> None:
        try:
            self._loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop is gone, and its calls with it
            pass

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._current is not None:
                self._current.cancel()


def _lock_order(d: Digest) -> int:
    # Every holder of several fetch locks takes them in the order of their lock-file bytes
    # (LocalDiskStore keys them by entry_key), so two batches that overlap cannot deadlock.
    return entry_key(d.function, d.hash, d.size, False)


class RemoteFetcher:
    def __init__(self, channel: grpc.aio.Channel, store: LocalDiskStore,
                 instance_name: str = "", *, max_batch_bytes: int | None = None,
                 max_in_flight: int = 8, timeout: float = 60.0):
        """channel: to the remote CAS; it should accept messages of the server's
        max_batch_total_size_bytes plus framing (a few % more), as BatchReadBlobs replies
        come that large. max_batch_bytes may lower the batch size further. max_in_flight
        bounds the batches and streams on the wire at once (over every call of this
        fetcher); timeout is per call, plus 1 s per MB for a stream."""
        if max_in_flight <= 0:
            raise ValueError(f"max_in_flight must be positive, got {max_in_flight}")
        self.instance_name = instance_name
        self._store = store
        self._max_batch_bytes = max_batch_bytes
        self._timeout = timeout
        self._caps: CasCapabilities | None = None
        self._gate = asyncio.Semaphore(max_in_flight)
        # One thread per call in flight; a little more for the calls' final clean-up.
        self._pool = ThreadPoolExecutor(max_in_flight + 2, thread_name_prefix="cas-fetch")
        self._capabilities_stub = re_grpc.CapabilitiesStub(channel)
        self._cas = re_grpc.ContentAddressableStorageStub(channel)
        self._bytestream = bs_grpc.ByteStreamStub(channel)

    def close(self) -> None:
        """Stop the pool; the channel stays the caller's."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- capabilities ---------------------------------------------------------------------

    async def capabilities(self, metadata: Metadata = ()) -> CasCapabilities:
        """The server's CAS capabilities, asked on first use (callers racing to be first
        may each ask: the answers are the same)."""
        if self._caps is None:
            request = re_pb2.GetCapabilitiesRequest(instance_name=self.instance_name)
            try:
                reply = await self._capabilities_stub.GetCapabilities(
                    request, metadata=metadata, timeout=self._timeout)
            except grpc.RpcError as e:
                raise FetchUnavailable(f"GetCapabilities failed: {rpc_reason(e)}") from e
            self._caps = CasCapabilities.from_proto(reply)
        return self._caps

    async def read_budget(self, function: str, metadata: Metadata = ()) -> int:
        """The most serialized bytes one BatchReadBlobs may ask for (remote_wire.plan's
        budget); RemoteCasError if the server lacks the digest function."""
        caps = await self.capabilities(metadata)
        caps.check_function(function)
        # A reply entry is a request entry plus its status (2 bytes when OK): keep 1/32 more
        # headroom so a batch planned for the request size still fits the reply limit.
        budget = caps.batch_budget(self._max_batch_bytes)
        return budget - budget // 32

    # -- blobs ------------------------------------------------------------------------------

    async def fetch_blobs(self, function: str, digests: list[Digest],
                          metadata: Metadata = ()) -> FetchStats:
        """Make every digest present in the local store. MissingInputs names every blob the
        remote lacks (the others are stored); FetchUnavailable when calls failed or content
        did not match (nothing of those blobs is stored)."""
        wanted = [d for d in dict.fromkeys(digests) if d.size]
        for d in wanted:
            if d.function != function:
                raise ValueError(f"{d} is not a {function} digest")
        stats = FetchStats(blobs=len(wanted))
        if not wanted:
            return stats
        absent = await asyncio.to_thread(self._store.find_missing, wanted)
        stats.local = len(wanted) - len(absent)
        if not absent:
            return stats
        await asyncio.to_thread(self._check_room, absent)
        budget = await self.read_budget(function, metadata)
        work = plan([Item(d, b"") for d in absent], self.instance_name, function, budget)
        # Longest first keeps every call busy to the end.
        streams = sorted((i.digest for i in work.streams), key=lambda d: -d.size)
        jobs = [self._run(self._locked_stream, d, metadata) for d in streams]
        # A batch holds a fetch lock per blob, and each lock taken costs the kernel a walk
        # over every lock held on the file: at most _MAX_BATCH_BLOBS per batch, or 100k
        # small inputs take minutes (quadratic) to lock.
        jobs += [self._run(self._locked_batch, function,
                           [i.digest for i in batch[at:at + _MAX_BATCH_BLOBS]], metadata)
                 for batch in work.batches for at in range(0, len(batch), _MAX_BATCH_BLOBS)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        missing: list[Digest] = []
        corrupt: list[Digest] = []
        unavailable: list[FetchUnavailable] = []
        for r in results:
            if isinstance(r, _Outcome):
                stats.add(r.stats)
                missing += r.missing
                corrupt += r.corrupt
            elif isinstance(r, FetchUnavailable):
                unavailable.append(r)
            else:
                raise r  # a local failure (a full disk, ...): the pipeline's to judge
        if unavailable:
            failed = [d for e in unavailable for d in e.digests]
            raise type(unavailable[0])(
                f"{len(failed)} of {len(absent)} blob(s) could not be fetched from the remote "
                f"CAS: {unavailable[0]}", failed) from unavailable[0]
        if corrupt:
            shown = ", ".join(str(d) for d in corrupt[:5])
            raise CorruptRemoteBlob(f"the remote CAS served content that does not match "
                                    f"{len(corrupt)} digest(s): {shown}", corrupt)
        if missing:
            raise MissingInputs(missing)
        return stats

    def _check_room(self, digests: list[Digest]) -> None:
        """ResourceExhausted, before a byte is read, when the blobs cannot all be stored:
        one or all of them larger than the local CAS may grow, or than its disk could hold
        (the free space plus what eviction could free). A size is only what the digest
        claims: a terabyte of made-up input must not fill the disk before it fails."""
        total = sum(d.size for d in digests)
        largest = max(digests, key=lambda d: d.size)
        limit = self._store.max_size_bytes
        if limit and largest.size > limit:
            raise ResourceExhausted(f"input blob {largest} is larger than the whole local "
                                    f"CAS ({limit} bytes, local_cache.max_size_bytes)")
        if limit and total > limit:
            raise ResourceExhausted(f"the {len(digests)} input blob(s) to fetch take {total} "
                                    f"bytes, more than the whole local CAS ({limit} bytes, "
                                    "local_cache.max_size_bytes)")
        try:
            st = os.statvfs(self._store.root)
        except OSError:
            return
        room = st.f_bavail * st.f_frsize + self._store.stats()["total_bytes"]
        if total > room:
            raise ResourceExhausted(f"the {len(digests)} input blob(s) to fetch take {total} "
                                    f"bytes; the local CAS's disk can hold {room}")

    async def _run(self, work: Callable[..., _Outcome], *args) -> _Outcome:
        """work(bridge, *args) in the pool, within the in-flight bound."""
        async with self._gate:
            bridge = _Bridge(asyncio.get_running_loop())
            future = asyncio.get_running_loop().run_in_executor(self._pool, work, bridge, *args)
            try:
                return await future
            except asyncio.CancelledError:
                # The thread winds down by itself (temp file removed, locks released).
                bridge.cancel()
                raise

    def _locked_batch(self, bridge: _Bridge, function: str, digests: list[Digest],
                      metadata: Metadata) -> _Outcome:
        out = _Outcome()
        with ExitStack() as locks:
            for d in sorted(digests, key=_lock_order):
                locks.enter_context(self._store.fetch_lock(d))
            bridge.check()
            need = [d for d in digests if not self._store.has(d)]
            out.stats.shared = len(digests) - len(need)
            if not need:
                return out
            out.stats.batches = 1
            blobs, out.missing = bridge.call(self._batch_read, function, need, metadata)
            errors = self._store.write_many(blobs)
            for (d, _), error in zip(blobs, errors, strict=True):
                if error is None:
                    out.stats.fetched += 1
                    out.stats.bytes += d.size
                elif isinstance(error, DigestMismatch):
                    out.corrupt.append(d)
                else:
                    raise error
        return out

    async def _batch_read(self, function: str, digests: list[Digest], metadata: Metadata
                          ) -> tuple[list[tuple[Digest, bytes]], list[Digest]]:
        """(digest, content) of each blob read, and the digests the remote lacks."""
        request = re_pb2.BatchReadBlobsRequest(
            instance_name=self.instance_name, digests=[digest_pb(d) for d in digests],
            digest_function=function_enum(function))
        try:
            reply = await self._cas.BatchReadBlobs(request, metadata=metadata,
                                                   timeout=self._timeout)
        except grpc.RpcError as e:
            raise FetchUnavailable(f"BatchReadBlobs failed: {rpc_reason(e)}", digests) from e
        wanted = {(d.hash, d.size): d for d in digests}
        blobs, missing = [], []
        for r in reply.responses:
            d = wanted.pop((r.digest.hash, r.digest.size_bytes), None)
            if d is None:
                continue  # not asked for, or answered twice: never stored
            if r.status.code == _NOT_FOUND:
                missing.append(d)
            elif r.status.code != 0:
                raise FetchUnavailable(f"BatchReadBlobs of {d}: status {r.status.code}: "
                                       f"{r.status.message}", digests)
            elif r.compressor != re_pb2.Compressor.IDENTITY:
                raise FetchUnavailable(f"BatchReadBlobs of {d}: compressor {r.compressor} "
                                       "was not asked for", digests)
            else:
                blobs.append((d, r.data))
        if wanted:
            raise FetchUnavailable(f"BatchReadBlobs returned no entry for {len(wanted)} "
                                   f"blob(s), e.g. {next(iter(wanted.values()))}", digests)
        return blobs, missing

    def _locked_stream(self, bridge: _Bridge, d: Digest, metadata: Metadata) -> _Outcome:
        out = _Outcome()
        with self._store.fetch_lock(d):
            bridge.check()
            if self._store.has(d):
                out.stats.shared = 1
                return out
            out.stats.streams = 1
            read = _ResumedRead(self, bridge, d, metadata)
            try:
                self._store.write(d, read.chunks())
            except _RemoteNotFound:
                out.missing.append(d)
                return out
            except DigestMismatch:
                out.corrupt.append(d)
                return out
            finally:
                read.close()
            out.stats.resumed = read.resumed
        out.stats.fetched = 1
        out.stats.bytes = d.size
        return out

    async def _open_read(self, d: Digest, offset: int, metadata: Metadata, left: float):
        """A Read from offset, within left seconds at most."""
        request = bs_pb2.ReadRequest(resource_name=read_resource(self.instance_name, d),
                                     read_offset=offset)
        timeout = min(stream_timeout(self._timeout, d.size - offset), max(left, 0.001))
        return self._bytestream.Read(request, metadata=metadata, timeout=timeout)

    async def _next_chunk(self, call, d: Digest) -> bytes | None:
        try:
            # The call's deadline grows with the size the digest claims (stream_timeout);
            # a stream that goes quiet is cut after one timeout whatever it claims.
            response = await asyncio.wait_for(call.read(), self._timeout)
        except TimeoutError:
            raise _StreamBroken(f"ByteStream Read of {d} stalled: no data for "
                                f"{self._timeout:g}s", stalled=True) from None
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise _RemoteNotFound() from None
            if e.code() in _RESUMABLE:
                raise _StreamBroken(f"ByteStream Read of {d} failed: {rpc_reason(e)}") from e
            raise FetchUnavailable(f"ByteStream Read of {d} failed: {rpc_reason(e)}",
                                   [d]) from e
        if response is grpc.aio.EOF:
            return None
        return response.data

    # -- trees ------------------------------------------------------------------------------

    async def fetch_tree(self, function: str, root: Digest, metadata: Metadata = ()) -> None:
        """Make every Directory of the tree under root present in the local store (the files
        are fetch_blobs' job). What the store has is read from it; if anything is absent,
        one GetTree brings the whole tree. A directory GetTree left out (or whose message
        re-serializes to other bytes than its digest's) is read by digest, level by level,
        which is also the whole method if the server has no GetTree. GetTree's directories
        are stored without fetch locks: one call brings the whole tree, and two processes
        storing the same directory store the same verified bytes."""
        tree: _Tree | None = None  # None: GetTree not called yet
        level = [root]
        seen = {root}
        depth = entries = 0
        while level:
            found, absent = await asyncio.to_thread(self._take_level, level, tree or {})
            if absent and tree is None:
                tree = await self._get_tree(function, root, metadata)
                more, absent = await asyncio.to_thread(self._take_level, absent, tree)
                found.update(more)
            if absent:
                await self.fetch_blobs(function, absent, metadata)
                more, absent = await asyncio.to_thread(self._take_level, absent, {})
                if absent:  # evicted again at once: the cache is far too small
                    raise FetchUnavailable(f"directory {absent[0]} left the local CAS "
                                           "right after it was fetched", absent)
                found.update(more)
            nxt = []
            for d in level:
                # The input tree limits (engine/pipeline/inputs.py), checked here too: a tree
                # past one is refused at that level, not after fetching all of it.
                directory = found[d]
                count = len(directory.files) + len(directory.directories) + \
                    len(directory.symlinks)
                entries += count
                if count > MAX_DIRECTORY_ENTRIES:
                    raise InvalidArgument(f"input directory {d} has {count} entries, more "
                                          f"than the {MAX_DIRECTORY_ENTRIES} allowed in one "
                                          "directory")
                if entries > DEFAULT_MAX_ENTRIES:
                    raise InvalidArgument(f"input root has more than {DEFAULT_MAX_ENTRIES} "
                                          "entries")
                if directory.directories and depth == MAX_DEPTH:
                    raise InvalidArgument(f"input directory {d}: directory "
                                          f"{directory.directories[0].name[:120]!r} would be "
                                          f"nested more than {MAX_DEPTH} levels deep, the "
                                          "limit for input trees")
                for child in directory.directories:
                    try:
                        cd = dg.from_proto(function, child.digest)
                    except dg.DigestError:
                        continue  # resolving the tree reports it, with its path
                    if cd not in seen:
                        seen.add(cd)
                        nxt.append(cd)
            level = nxt
            depth += 1

    def _take_level(self, level: list[Digest], tree: _Tree
                    ) -> tuple[dict[Digest, re_pb2.Directory], list[Digest]]:
        """Each directory of level from tree (stored if the store lacks it) or from the
        store; the digests neither has."""
        found: dict[Digest, re_pb2.Directory] = {}
        absent: list[Digest] = []
        new: list[tuple[Digest, bytes]] = []
        for d in level:
            if d in tree:
                data, found[d] = tree[d]
                if not self._store.has(d):
                    new.append((d, data))
                continue
            if d.size > MAX_DIRECTORY_BYTES:
                raise InvalidArgument(f"Directory {d} is {d.size} bytes, more than the "
                                      f"{MAX_DIRECTORY_BYTES} allowed")
            try:
                data = self._store.read_bytes(d)
            except BlobNotFound:
                absent.append(d)
                continue
            try:
                found[d] = re_pb2.Directory.FromString(data)
            except DecodeError as e:
                raise InvalidArgument(f"input directory {d} is not a Directory: {e}") from None
        for error in self._store.write_many(new) if new else ():
            if error is not None:
                raise error
        return found, absent

    async def _get_tree(self, function: str, root: Digest, metadata: Metadata) -> _Tree:
        """Every directory GetTree returns, under the digest of its serialized bytes; {} if
        the server has no GetTree. A server that keeps paging (more directories than a
        valid input tree has, more than _MAX_TREE_CALLS calls, or calls past the timeout)
        is not asked further: what it sent is kept, the walk reads the rest by digest."""
        directories: list[re_pb2.Directory] = []
        token = ""
        tokens = set()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._timeout
        calls = 0
        while True:
            request = re_pb2.GetTreeRequest(
                instance_name=self.instance_name, root_digest=digest_pb(root),
                page_token=token, digest_function=function_enum(function))
            token = ""
            calls += 1
            try:
                stream = self._cas.GetTree(request, metadata=metadata, timeout=self._timeout)
                async for page in stream:
                    directories.extend(page.directories)
                    token = page.next_page_token
                    if len(directories) > DEFAULT_MAX_ENTRIES:
                        stream.cancel()
                        token = ""
                        break
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return {}
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    raise MissingInputs([root]) from None
                raise FetchUnavailable(f"GetTree of {root} failed: {rpc_reason(e)}",
                                       [root]) from e
            # A server may end the stream after a page and expect a call per page.
            if not token or token in tokens or calls >= _MAX_TREE_CALLS or \
                    loop.time() > give_up:
                break
            tokens.add(token)
        return await asyncio.to_thread(_by_digest, function, directories)


class _ResumedRead:
    """The content of one blob from ByteStream Reads: when a Read breaks off (_RESUMABLE, or
    once, no data for a timeout), another one asks for the rest (read_offset = bytes
    received), after a pause that doubles while Reads bring nothing and starts over once
    one does. All of them together get the time one Read of the whole blob would, plus one
    timeout (a server that trickles and breaks cannot hold a fetch for long). The store
    hashes the whole, so a server that resumes at the wrong place is caught as a digest
    mismatch, never stored."""

    def __init__(self, fetcher: RemoteFetcher, bridge: _Bridge, d: Digest,
                 metadata: Metadata):
        self._fetcher = fetcher
        self._bridge = bridge
        self._d = d
        self._metadata = metadata
        self._call = None
        self.resumed = 0

    def chunks(self) -> Iterator[bytes]:
        received = reads = barren = stalls = 0
        timeout = self._fetcher._timeout
        deadline = time.monotonic() + stream_timeout(timeout, self._d.size) + timeout
        while True:
            reads += 1
            left = deadline - time.monotonic()
            self._call = self._bridge.call(self._fetcher._open_read, self._d, received,
                                           self._metadata, left)
            before = received
            try:
                while (data := self._bridge.call(self._fetcher._next_chunk, self._call,
                                                 self._d)) is not None:
                    received += len(data)
                    if data:
                        yield data
                return
            except _StreamBroken as e:
                self.close()
                if received >= self._d.size:
                    return  # all there but the end of the stream: the hash decides
                barren = 0 if received > before else barren + 1
                stalls += e.stalled
                if barren > _MAX_BARREN_READS or reads >= _MAX_READS or \
                        stalls > _MAX_STALLS or time.monotonic() >= deadline:
                    raise FetchUnavailable(
                        f"{e} (after {reads} Read(s), {received} of {self._d.size} bytes "
                        "received)", [self._d]) from e
                log.warning("%s; reading on from byte %d of %d", e, received, self._d.size)
                if barren:
                    self._bridge.call(asyncio.sleep, _FIRST_BACKOFF_S * 2 ** (barren - 1))
                self.resumed += 1

    def close(self) -> None:
        if self._call is not None:
            self._bridge.call_soon(self._call.cancel)  # a no-op once the call ended
            self._call = None


def _by_digest(function: str, directories: list[re_pb2.Directory]) -> _Tree:
    out: _Tree = {}
    for message in directories:
        data = message.SerializeToString()
        out[Digest(function, hashing.hash_bytes(function, data), len(data))] = (data, message)
    return out
