"""Upload 1 GiB of action outputs to `stoker up` with the CAS uploader, against raw gRPC.

The outputs: 4 files of 231 MiB and 10,000 files of 1-20 KiB (random bytes, so zstd 'auto'
leaves them uncompressed), digested beforehand as the upload step receives them.

Stoker: AsyncUploader.upload() (grpc.aio on uvloop, the workers' hot path) into one embedded
server: FindMissingBlobs, BatchUpdateBlobs for the small files, ByteStream Write of the large
ones in 1 MiB frames from mmap'd slices, 4 calls in flight. Each round first renews every
file's first bytes so the server lacks them all, and is timed by the code `stoker bench`
uses (engine.benchmark.upload.upload_seconds: the connection is set up before the clock
starts), so the two agree.

Also measured: the same upload (and the sync RemoteStore.upload(), threads) to a REAPI CAS
that stores nothing (a sync grpc server in the reference's style), which isolates the
client side, the part the uploader controls; these rounds write nothing to disk.

Reference, in the same run: a minimal raw gRPC pair, a sync grpc server in a child process
with one client-streaming method that counts and discards what arrives, and a sync client
sending the same bytes in the same 1 MiB messages: each large file mapped and sliced, the
small files read and packed into 1 MiB messages, one stream at a time (its faster setting
here). It does no protobuf, digest checking, file writing or CAS bookkeeping, which
Stoker's server does for every byte.

Also measured: zstd level 1 against no compression for a compressible 400 MiB output
(build-log text), which decides what compress='auto' should do on loopback.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import uvloop
import zstandard

from bench.common import Measured
from engine import digest as dg
from engine import native
from engine.benchmark import upload as node_upload
from engine.benchmark.pipeline import EmbeddedStoker
from engine.benchmark.scratch import Workspace
from engine.cas.remote import RemoteStore
from engine.cas.remote_wire import CHUNK_SIZE
from engine.cas.uploader import AsyncUploader

MiB = 1 << 20
LARGE = 4
LARGE_SIZE = 231 * MiB  # with the small files: 1.0 GiB
SMALL = 10_000
IN_FLIGHT = 4
# One stream at a time beat 4 at once for the raw pair here, every round (e.g. 1,119-1,571
# vs 884-1,061 MB/s over 6 rounds), so the reference uses its faster setting.
REFERENCE_STREAMS = 1

# The reference server: one client-streaming method over raw bytes that counts and drops them.
SINK_SERVER = """
import sys
from concurrent import futures
import grpc

def put(requests, context):
    n = 0
    for chunk in requests:
        n += len(chunk)
    return n.to_bytes(8, "little")

handler = grpc.method_handlers_generic_handler(
    "bench.Sink", {"Put": grpc.stream_unary_rpc_method_handler(put)})
server = grpc.server(futures.ThreadPoolExecutor(16),
                     options=[("grpc.max_receive_message_length", 64 << 20)])
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
sys.stdin.read()  # runs until the parent closes our stdin
server.stop(0)
"""

# A REAPI CAS that stores nothing, in the same style as the sink: to measure the uploader's
# client side alone. FindMissingBlobs says everything is missing, batches are acknowledged
# unread, and a Write's frames are counted raw, only the first one parsed (for its size).
DISCARD_SERVER = """
import sys
from concurrent import futures
import grpc
from engine.proto import bs_pb2, re_pb2
from engine.server.capabilities_service import server_capabilities

def find_missing(request, context):
    return re_pb2.FindMissingBlobsResponse(missing_blob_digests=request.blob_digests)

def batch_update(request, context):
    reply = re_pb2.BatchUpdateBlobsResponse()
    for r in request.requests:
        reply.responses.add(digest=r.digest)
    return reply

def write(frames, context):
    size = None
    for frame in frames:
        if size is None:
            size = int(bs_pb2.WriteRequest.FromString(frame).resource_name.split("/")[-1])
    return bs_pb2.WriteResponse(committed_size=size).SerializeToString()

def unary(fn, req):
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=req.FromString,
        response_serializer=lambda m: m.SerializeToString())

server = grpc.server(futures.ThreadPoolExecutor(16),
                     options=[("grpc.max_receive_message_length", 64 << 20)])
server.add_generic_rpc_handlers((
    grpc.method_handlers_generic_handler("build.bazel.remote.execution.v2.Capabilities", {
        "GetCapabilities": unary(lambda r, c: server_capabilities(),
                                 re_pb2.GetCapabilitiesRequest)}),
    grpc.method_handlers_generic_handler(
        "build.bazel.remote.execution.v2.ContentAddressableStorage", {
            "FindMissingBlobs": unary(find_missing, re_pb2.FindMissingBlobsRequest),
            "BatchUpdateBlobs": unary(batch_update, re_pb2.BatchUpdateBlobsRequest)}),
    grpc.method_handlers_generic_handler("google.bytestream.ByteStream", {
        "Write": grpc.stream_unary_rpc_method_handler(write)}),
))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
sys.stdin.read()
server.stop(0)
"""
REPO = str(Path(__file__).resolve().parents[1])


class Child:
    """One of the servers above in a child process, on its own core and GIL."""

    def __init__(self, source: str):
        self.proc = subprocess.Popen([sys.executable, "-c", source], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.address = f"127.0.0.1:{int(self.proc.stdout.readline())}"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


class Outputs:
    """The files to upload and their digests."""

    def __init__(self, root: Path, *, large: int = LARGE, large_size: int = LARGE_SIZE,
                 small: int = SMALL, function: str = dg.SHA256):
        rng = random.Random(1985)
        self.large = []
        for i in range(large):
            path = root / f"large-{i}.bin"
            with open(path, "wb") as f:
                for _ in range(large_size // MiB):
                    f.write(os.urandom(MiB))
            self.large.append(str(path))
        small_dir = root / "small"
        small_dir.mkdir()
        self.small = []
        for i in range(small):
            path = small_dir / f"out-{i}.o"
            path.write_bytes(os.urandom(rng.randint(1024, 20 * 1024)))
            self.small.append(str(path))
        os.sync()  # no writeback of these during the timings
        paths = self.large + self.small
        self.items = [(dg.Digest(function, h, size), p)
                      for (h, size), p in zip(native.digest_many(function, paths), paths,
                                              strict=True)]
        self.bytes = sum(d.size for d, _ in self.items)


# ---- the reference -----------------------------------------------------------------------------


class RawSink:
    """The reference pair: the sink server in a child process and a sync client."""

    def __init__(self) -> None:
        self.server = Child(SINK_SERVER)
        self.channel = grpc.insecure_channel(self.server.address)
        self.put = self.channel.stream_unary("/bench.Sink/Put")

    def rate(self, outputs: Outputs) -> float:
        os.sync()
        t0 = time.perf_counter()
        self.send(outputs)
        return outputs.bytes / 1e6 / (time.perf_counter() - t0)

    def send(self, outputs: Outputs, streams: int = REFERENCE_STREAMS,
             chunk_size: int = CHUNK_SIZE) -> int:
        def large(path: str) -> int:
            reply = self.put(bytes(piece) for piece in native.chunks(path, chunk_size))
            return int.from_bytes(reply, "little")

        def small(paths: list[str]) -> int:
            def packed():
                buf = bytearray()
                for p in paths:
                    with open(p, "rb") as f:
                        buf += f.read()
                    if len(buf) >= chunk_size:
                        yield bytes(buf[:chunk_size])
                        del buf[:chunk_size]
                if buf:
                    yield bytes(buf)
            return int.from_bytes(self.put(packed()), "little")

        share = max(1, -(-len(outputs.small) // streams))
        with ThreadPoolExecutor(streams) as pool:
            jobs = [pool.submit(large, p) for p in outputs.large]
            jobs += [pool.submit(small, outputs.small[i:i + share])
                     for i in range(0, len(outputs.small), share)]
            sent = sum(j.result() for j in jobs)
        if sent != outputs.bytes:
            raise RuntimeError(f"the sink counted {sent} bytes, expected {outputs.bytes}")
        return sent

    def close(self) -> None:
        self.channel.close()
        self.server.close()


# ---- Stoker --------------------------------------------------------------------------------------


def upload_async(address: str, items, **options):
    async def run():
        async with grpc.aio.insecure_channel(address) as channel:
            uploader = AsyncUploader(channel, **{"max_in_flight": IN_FLIGHT, **options})
            return await uploader.upload(items)
    return uvloop.run(run())


def upload_sync(address: str, items, **options):
    store = RemoteStore.connect(address, **{"max_streams": IN_FLIGHT, **options})
    try:
        return store.upload(items)
    finally:
        store.close()


def timed_upload(ws: Workspace, upload, items, expect_bytes: int, **options) -> float:
    """Seconds to upload items into a fresh embedded server (started outside the timing)."""
    with EmbeddedStoker(workers=1, concurrency=1, parent=ws.root) as stoker:
        return _timed(upload, f"127.0.0.1:{stoker.port}", items, expect_bytes, **options)


def _timed(upload, address: str, items, expect_bytes: int, **options) -> float:
    os.sync()  # the previous round's writes are not flushed during this one
    t0 = time.perf_counter()
    stats = upload(address, items, **options)
    elapsed = time.perf_counter() - t0
    if stats.bytes != expect_bytes:
        raise RuntimeError(f"uploaded {stats.bytes} bytes, expected {expect_bytes}")
    return elapsed


def compressible_file(path: Path, size: int) -> None:
    rng = random.Random(7)
    words = ["compile", "link", "module", "warning:", "-O2", "src/", ".cc", "ok", "include",
             "target", "//pkg:lib", "cache", "hit", "miss", "0x7f3a", "error"]
    with open(path, "w") as f:
        written = 0
        while written < size:
            line = " ".join(rng.choice(words) for _ in range(12)) + f" {rng.random():.6f}\n"
            f.write(line)
            written += len(line)
        f.truncate(size)


def run(repeats: int, ws: Workspace | None = None) -> list[Measured]:
    own = ws is None
    ws = ws or Workspace()
    base = Path(ws.fresh_path("upload"))
    base.mkdir()
    try:
        outputs = Outputs(base)
        mb, n = outputs.bytes / 1e6, outputs.bytes
        sink, discard = RawSink(), Child(DISCARD_SERVER)
        try:
            sink.rate(outputs)  # warm up the page cache and the connection
            # The client side alone first: nothing is written to disk in these rounds.
            ref_client, client, client_sync = [], [], []
            for _ in range(repeats):
                ref_client.append(sink.rate(outputs))
                client.append(mb / _timed(upload_async, discard.address, outputs.items, n))
                client_sync.append(mb / _timed(upload_sync, discard.address, outputs.items, n))
            ref_stoker, stoker = [], []
            with EmbeddedStoker(workers=1, concurrency=1, parent=ws.root) as server:
                address = f"127.0.0.1:{server.port}"
                for _ in range(repeats):
                    ref_stoker.append(sink.rate(outputs))
                    # Same sizes, new content: not timed, as a worker has its digests.
                    outputs.items = node_upload.renew(outputs.large + outputs.small)
                    stoker.append(mb / node_upload.upload_seconds(address, outputs.items))
        finally:
            sink.close()
            discard.close()
        text = base / "build.log"
        compressible_file(text, 400 * MiB)
        text_item = [(dg.Digest(dg.SHA256, *native.hash_file(dg.SHA256, str(text))),
                      str(text))]
        size = text_item[0][0].size
        zstd, plain = [], []
        for _ in range(repeats):
            plain.append(size / 1e6 / timed_upload(ws, upload_async, text_item, size,
                                                   compress="never"))
            zstd.append(size / 1e6 / timed_upload(ws, upload_async, text_item, size,
                                                  compress="always"))
        with open(text, "rb") as f:
            head = f.read(64 * MiB)
        ratio = len(head) / len(zstandard.ZstdCompressor(level=1).compress(head))
    finally:
        if own:
            ws.close()
    what = (f"{LARGE} x {LARGE_SIZE // MiB} MiB + {SMALL:,} files of 1-20 KiB "
            f"({outputs.bytes / 2**30:.2f} GiB)")
    ref = "raw gRPC stream, same bytes and 1 MiB messages, to a discarding server"
    return [
        Measured(f"upload {what} to `stoker up`, AsyncUploader", "MB/s", stoker, ref_stoker,
                 ref, target=0.8,
                 note="end to end: Stoker's server parses every WriteRequest, writes every "
                      "blob to disk and verifies its digest (SHA-256), and keeps the CAS "
                      "index; the reference does none of that (its server only counts bytes; "
                      "it sends one stream at a time, its faster setting here); Stoker has "
                      f"{IN_FLIGHT} calls in flight; native core: {native.IMPLEMENTATION}"),
        Measured(f"upload {what} to a discarding REAPI CAS, AsyncUploader", "MB/s", client,
                 ref_client, ref, target=0.8,
                 note="the client side alone: the same upload (FindMissingBlobs, batches, "
                      "ByteStream) to a sync gRPC server in the reference's style that "
                      "stores nothing and parses only what it must"),
        Measured(f"upload {what} to a discarding REAPI CAS, RemoteStore.upload (threads)",
                 "MB/s", client_sync, ref_client, ref, target=0.8),
        Measured("upload 400 MiB of build-log text to `stoker up`, zstd level 1 vs none",
                 "MB/s", zstd, plain, "the same upload uncompressed", target=0.0,
                 note=f"zstd level 1 shrinks it {ratio:.1f}x; ratio > 1 means compressing "
                      "pays on loopback"),
    ]


if __name__ == "__main__":
    from bench.common import table

    print(table(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
