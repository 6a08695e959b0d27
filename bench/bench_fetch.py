"""Fetch 1 GiB of action inputs from `stoker up` into an empty local CAS with RemoteFetcher,
against raw gRPC reads of the same bytes.

The inputs: 4 blobs of 192 MiB and 10,000 blobs of 20-30 KiB (random bytes), held by one
embedded `stoker up`, the remote CAS of joined mode. BENCH_FETCH_SCALE (default 1) scales
the large blobs' size and the small blobs' count: 0.1 is a quick run of ~100 MB.

Stoker: RemoteFetcher.fetch_blobs() (grpc.aio on uvloop, 8 calls in flight) into a fresh
LocalDiskStore each round: find_missing on the local store, BatchReadBlobs of the small blobs
in batches under the server's limit, ByteStream Read of the large ones, each blob verified
(SHA-256) and written to disk under its machine-wide fetch lock. The connection is made and
Capabilities read before the clock starts; pending writeback is flushed first.

References, in the same run, alternating with it:
- raw reads: the same reads with plain grpc.aio stubs on the same kind of loop, with the same
  8 calls in flight (ByteStream Read of each large blob, BatchReadBlobs of the same batches),
  the bytes counted and dropped: no hashing, no disk, no locks.
- plain store: the same reads, and each blob hashed (hashlib's SHA-256, OpenSSL: as fast as
  the native core) and written to a new file of its own beside Stoker's cache, in a thread
  per batch or message as Stoker does: the least work that verifies and keeps the bytes,
  without temp names, renames, fetch locks or an index.
All read from the same server, whose page cache holds every blob. On 2 cores the server and
the client share the CPU, and the raw reads already keep both busy: the gap to them is what
hashing and writing cost on this machine, which the plain store measures.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import uvloop

from bench.common import Measured
from engine import digest as dg
from engine import native
from engine.benchmark.pipeline import EmbeddedStoker
from engine.benchmark.scratch import Workspace, remove_tree
from engine.cas.fetcher import RemoteFetcher
from engine.cas.local_disk import LocalDiskStore
from engine.cas.remote import RemoteStore
from engine.cas.remote_wire import Item, digest_pb, function_enum, plan, read_resource
from engine.digest import Digest
from engine.proto import bs_grpc, bs_pb2, re_grpc, re_pb2

MiB = 1 << 20
LARGE = 4
LARGE_SIZE = 192 * MiB
SMALL = 10_000
SMALL_SIZES = (20 << 10, 30 << 10)
IN_FLIGHT = 8
# BatchReadBlobs replies come close to the server's 4 MiB batch limit, gRPC's default.
OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


def scale() -> float:
    value = float(os.environ.get("BENCH_FETCH_SCALE", "1"))
    if not 0 < value <= 1:
        raise ValueError(f"BENCH_FETCH_SCALE must be in (0, 1], got {value}")
    return value


class Inputs:
    """The blobs, uploaded to the remote; only their digests stay here."""

    def __init__(self, root: Path, address: str, factor: float,
                 function: str = dg.SHA256) -> None:
        self.large_size = max(5 * MiB, round(LARGE_SIZE * factor / MiB) * MiB)
        self.small = max(10, round(SMALL * factor))
        self.function = function
        remote = RemoteStore.connect(address, function=function, max_streams=4)
        try:
            paths = []
            for i in range(LARGE):
                path = root / f"large-{i}.bin"
                with open(path, "wb") as f:
                    for _ in range(self.large_size // MiB):
                        f.write(os.urandom(MiB))
                paths.append(str(path))
            self.digests = [Digest(function, h, n)
                            for h, n in native.digest_many(function, paths)]
            remote.upload(zip(self.digests, paths, strict=True))
            for path in paths:
                os.unlink(path)
            rng = random.Random(1985)
            for start in range(0, self.small, 1000):  # a slice at a time in memory
                blobs = [os.urandom(rng.randint(*SMALL_SIZES))
                         for _ in range(min(1000, self.small - start))]
                items = [(dg.of_bytes(function, b), b) for b in blobs]
                remote.upload(items)
                self.digests += [d for d, _ in items]
        finally:
            remote.close()
        self.bytes = sum(d.size for d in self.digests)

    def describe(self) -> str:
        return (f"{LARGE} x {self.large_size // MiB} MiB + {self.small:,} blobs of "
                f"{SMALL_SIZES[0] >> 10}-{SMALL_SIZES[1] >> 10} KiB "
                f"({self.bytes / 2**30:.2f} GiB)")


def fetch_seconds(address: str, inputs: Inputs, cache_dir: str) -> float:
    """One timed RemoteFetcher.fetch_blobs into a fresh local CAS at cache_dir, left in place:
    on ext4 without a journal, creating files next to inodes freed in the last ~30 s scans
    past each of them (ext4's recently_deleted), which would slow the next round down."""
    async def run() -> float:
        async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
            with LocalDiskStore(cache_dir) as store:
                fetcher = RemoteFetcher(channel, store, max_in_flight=IN_FLIGHT)
                try:
                    await fetcher.capabilities()
                    os.sync()
                    t0 = time.perf_counter()
                    stats = await fetcher.fetch_blobs(inputs.function, inputs.digests)
                    elapsed = time.perf_counter() - t0
                finally:
                    fetcher.close()
        if stats.bytes != inputs.bytes:
            raise RuntimeError(f"fetched {stats.bytes} bytes, expected {inputs.bytes}")
        return elapsed

    return uvloop.run(run())


def read_budget(address: str, function: str, scratch: str) -> int:
    """The batch budget RemoteFetcher uses with this server, so both sides batch alike."""
    async def run() -> int:
        async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
            with LocalDiskStore(scratch) as store:
                fetcher = RemoteFetcher(channel, store)
                try:
                    return await fetcher.read_budget(function)
                finally:
                    fetcher.close()

    try:
        return uvloop.run(run())
    finally:
        remove_tree(scratch)


Sink = Callable[[bytes | None], None]  # one blob's messages, then None at its end


def reads_seconds(address: str, inputs: Inputs, budget: int,
                  keep_stream: Callable[[], Sink] | None = None,
                  keep_batch: Callable[[list[bytes]], None] | None = None) -> float:
    """The reads RemoteFetcher makes, on plain stubs and timed: ByteStream Read of each large
    blob, BatchReadBlobs of the same batches, IN_FLIGHT at a time. keep_stream() gives a
    sink for one streamed blob, keep_batch takes a batch's blobs, both called in a thread;
    without them the bytes are counted and dropped."""
    fn = inputs.function
    work = plan([Item(d, b"") for d in inputs.digests], "", fn, budget)

    async def run() -> float:
        async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
            cas = re_grpc.ContentAddressableStorageStub(channel)
            bytestream = bs_grpc.ByteStreamStub(channel)
            await re_grpc.CapabilitiesStub(channel).GetCapabilities(
                re_pb2.GetCapabilitiesRequest())
            gate = asyncio.Semaphore(IN_FLIGHT)

            async def stream(d: Digest) -> int:
                async with gate:
                    n = 0
                    sink = keep_stream() if keep_stream else None
                    request = bs_pb2.ReadRequest(resource_name=read_resource("", d))
                    async for response in bytestream.Read(request):
                        if sink:
                            await asyncio.to_thread(sink, response.data)
                        n += len(response.data)
                    if sink:
                        sink(None)
                    return n

            async def batch(items: list[Item]) -> int:
                async with gate:
                    reply = await cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
                        digests=[digest_pb(i.digest) for i in items],
                        digest_function=function_enum(fn)))
                    blobs = [r.data for r in reply.responses]
                    if keep_batch:
                        await asyncio.to_thread(keep_batch, blobs)
                    return sum(map(len, blobs))

            os.sync()
            t0 = time.perf_counter()
            sizes = await asyncio.gather(
                *[stream(i.digest) for i in sorted(work.streams, key=lambda i: -i.digest.size)],
                *[batch(b) for b in work.batches])
            elapsed = time.perf_counter() - t0
        if sum(sizes) != inputs.bytes:
            raise RuntimeError(f"read {sum(sizes)} bytes, expected {inputs.bytes}")
        return elapsed

    return uvloop.run(run())


def stored_seconds(address: str, inputs: Inputs, budget: int, root: str) -> float:
    """The plain store: the same reads, each blob hashed and written to a new file under
    root (made here, left in place like Stoker's caches)."""
    if inputs.function != dg.SHA256:
        raise ValueError("the plain store hashes SHA-256 only")
    os.makedirs(root)
    names = itertools.count()

    def new_file() -> int:
        return os.open(f"{root}/{next(names)}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)

    def keep_stream() -> Sink:
        hasher, fd = hashlib.sha256(), new_file()

        def keep(data: bytes | None) -> None:
            if data is None:
                hasher.digest()
                os.close(fd)
            else:
                hasher.update(data)
                os.write(fd, data)
        return keep

    def keep_batch(blobs: list[bytes]) -> None:
        for data in blobs:
            hashlib.sha256(data).digest()
            fd = new_file()
            os.write(fd, data)
            os.close(fd)

    return reads_seconds(address, inputs, budget, keep_stream, keep_batch)


def run(repeats: int, ws: Workspace | None = None) -> list[Measured]:
    own = ws is None
    ws = ws or Workspace()
    try:
        base = Path(ws.fresh_path("fetch"))
        (base / "caches").mkdir(parents=True)
        with EmbeddedStoker(workers=1, concurrency=1, parent=ws.root) as server:
            address = f"127.0.0.1:{server.port}"
            inputs = Inputs(base, address, scale())
            budget = read_budget(address, inputs.function, ws.fresh_path("fetch-budget"))
            reads_seconds(address, inputs, budget)  # warm up the server's page cache
            mb = inputs.bytes / 1e6
            caches = (str(base / "caches" / str(n)) for n in itertools.count())
            raw, stoker, stored = [], [], []
            for _ in range(repeats):  # alternating, each in a fresh directory beside the last
                raw.append(mb / reads_seconds(address, inputs, budget))
                stoker.append(mb / fetch_seconds(address, inputs, next(caches)))
                stored.append(mb / stored_seconds(address, inputs, budget, next(caches)))
        remove_tree(str(base))
    finally:
        if own:
            ws.close()
    name = f"fetch {inputs.describe()} from `stoker up` into an empty local CAS, RemoteFetcher"
    return [
        Measured(name, "MB/s", stoker, raw,
                 f"raw grpc.aio reads of the same bytes ({IN_FLIGHT} in flight), discarded",
                 target=0.8,
                 note=f"both read the same server; Stoker also verifies every blob (SHA-256, "
                      f"native core: {native.IMPLEMENTATION}), writes it to disk and takes "
                      f"its fetch lock; {IN_FLIGHT} calls in flight both; scale {scale():g}; "
                      "the plain store below, in the same run, shows what of the gap is "
                      "hashing and writing on this machine"),
        Measured(f"{name}, vs the same reads hashed and written by plain Python", "MB/s",
                 stoker, stored,
                 "the same reads, each blob SHA-256'd (hashlib) and written to a new file "
                 "in a thread: no temp names, renames, locks or index",
                 target=0.9,
                 note=f"the same Stoker rounds as the row above; the plain store did "
                      f"{_share(stored, raw)} of the raw reads' rate: what verifying and "
                      "writing 1 GiB, 10k files of it, cost here"),
    ]


def _share(part: list[float], whole: list[float]) -> str:
    return f"{statistics.median(part) / statistics.median(whole):.2f}"


if __name__ == "__main__":
    from bench.common import table

    print(table(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
