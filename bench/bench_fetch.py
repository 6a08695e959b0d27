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

Reference, in the same run, alternating with it: the same reads with plain grpc.aio stubs on
the same kind of loop, with the same 8 calls in flight (ByteStream Read of each large blob,
BatchReadBlobs of the same batches), the bytes counted and dropped: no hashing, no disk, no
locks. Both read from the same server, whose page cache holds every blob.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import sys
import time
from pathlib import Path

import grpc
import uvloop

from bench.common import Measured, alternate_timed
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


def raw_seconds(address: str, inputs: Inputs, budget: int) -> float:
    """The reference: the same reads, plain stubs, bytes dropped."""
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
                    request = bs_pb2.ReadRequest(resource_name=read_resource("", d))
                    async for response in bytestream.Read(request):
                        n += len(response.data)
                    return n

            async def batch(items: list[Item]) -> int:
                async with gate:
                    reply = await cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
                        digests=[digest_pb(i.digest) for i in items],
                        digest_function=function_enum(fn)))
                    return sum(len(r.data) for r in reply.responses)

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
            raw_seconds(address, inputs, budget)  # warm up the server's page cache
            mb = inputs.bytes / 1e6
            caches = (str(base / "caches" / str(n)) for n in itertools.count())
            stoker, reference = alternate_timed(
                repeats, mb, lambda: fetch_seconds(address, inputs, next(caches)),
                lambda: raw_seconds(address, inputs, budget))
        remove_tree(str(base))
    finally:
        if own:
            ws.close()
    return [Measured(
        f"fetch {inputs.describe()} from `stoker up` into an empty local CAS, RemoteFetcher",
        "MB/s", stoker, reference,
        f"raw grpc.aio reads of the same bytes ({IN_FLIGHT} in flight), discarded",
        target=0.8,
        note=f"both read the same server; Stoker also verifies every blob (SHA-256, native "
             f"core: {native.IMPLEMENTATION}), writes it to disk and takes its fetch lock; "
             f"{IN_FLIGHT} calls in flight both; scale {scale():g}")]


if __name__ == "__main__":
    from bench.common import table

    print(table(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
