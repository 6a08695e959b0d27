"""RemoteFetcher (engine/cas/fetcher.py): a remote CAS into the shared local CAS.

The remote is a real `engine up` over loopback gRPC, except where the test needs a remote
that misbehaves on purpose: FakeCas, a small grpc.aio CAS defined here that serves what it
is given (wrong bytes, a stream that stalls, no GetTree, non-canonical Directory bytes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import uvloop

from engine import digest as dg
from engine.cas.fetcher import CorruptRemoteBlob, FetchStats, FetchUnavailable, RemoteFetcher
from engine.cas.local_disk import LocalDiskStore
from engine.cas.remote import RemoteStore
from engine.cas.remote_wire import varint
from engine.errors import MissingInputs, to_status
from engine.proto import bs_grpc, bs_pb2, code_pb2, re_grpc, re_pb2
from engine.server.capabilities_service import server_capabilities
from tests.cas.remote_support import new_server, shared_server, stop_server
from tests.cas.test_remote import server_pid
from tests.integration.support import BLAKE3, SHA256, build_tree, precondition_failure

MiB = 1 << 20
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]
AUTH = (("authorization", "Bearer task-jwt"),)
FN_ENUM = {dg.SHA256: SHA256, dg.BLAKE3: BLAKE3}
SPAWN = multiprocessing.get_context("spawn")


# ---- helpers ---------------------------------------------------------------------------------


class Methods:
    """Records the short name of every call the fetcher makes (grpc.aio files an interceptor
    under one kind only, so there is one per kind)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.interceptors = [_Unary(self.names), _Streaming(self.names)]


class _Recording:
    def __init__(self, names: list[str]) -> None:
        self.names = names

    async def _note(self, continuation, details, request):
        self.names.append(_short(details.method))
        return await continuation(details, request)


class _Unary(_Recording, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _Recording._note


class _Streaming(_Recording, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _Recording._note


def _short(method: str | bytes) -> str:
    return (method.decode() if isinstance(method, bytes) else method).rsplit("/", 1)[-1]


@asynccontextmanager
async def fetcher_for(address: str, store: LocalDiskStore, methods: Methods | None = None,
                      **options) -> AsyncIterator[RemoteFetcher]:
    interceptors = methods.interceptors if methods else None
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS,
                                         interceptors=interceptors) as channel:
        fetcher = RemoteFetcher(channel, store, **options)
        try:
            yield fetcher
        finally:
            fetcher.close()


def blobs_of(function: str, *contents: bytes) -> dict[dg.Digest, bytes]:
    return {dg.of_bytes(function, c): c for c in contents}


def upload(address: str, function: str, blobs: dict[dg.Digest, bytes]) -> None:
    remote = RemoteStore.connect(address, function=function)
    try:
        remote.upload(blobs.items())
    finally:
        remote.close()


def call(address: str, store: LocalDiskStore, method: str, *args,
         methods: Methods | None = None, **options):
    """RemoteFetcher.<method>(*args, AUTH) on a fetcher and loop of its own."""
    async def run():
        async with fetcher_for(address, store, methods, **options) as f:
            return await getattr(f, method)(*args, AUTH)
    return uvloop.run(run())


def fetch(address: str, store: LocalDiskStore, function: str, digests,
          methods: Methods | None = None, **options) -> FetchStats:
    return call(address, store, "fetch_blobs", function, list(digests), methods=methods,
                **options)


def assert_clean(store: LocalDiskStore) -> None:
    """No temp file left behind, and every cached file holds what its name says."""
    assert os.listdir(os.path.join(store.root, "tmp")) == []
    for dirpath, _, files in os.walk(os.path.join(store.root, "cas")):
        function = Path(dirpath).parent.name
        for name in files:
            h, size = name.split("-")[:2]
            assert dg.of_file(function, os.path.join(dirpath, name)) == \
                dg.Digest(function, h, int(size)), f"{dirpath}/{name} is corrupt"


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture
def store(tmp_path):
    s = LocalDiskStore(str(tmp_path / "cache"))
    yield s
    s.close()


# ---- a fake remote that misbehaves on purpose ---------------------------------------------


class FakeCas(re_grpc.ContentAddressableStorageServicer, re_grpc.CapabilitiesServicer,
              bs_grpc.ByteStreamServicer):
    """A fake remote CAS: serves `served` (what it claims to hold under each digest, right or
    wrong) and records each call's method and metadata. Read streams messages of
    message_size (1 MiB) from
    read_offset (from 0 if ignore_offset), and waits for `resume` after `stall_after` of
    them when that is set; while `breaks` > 0 a Read aborts UNAVAILABLE after `break_after`
    messages (and counts one break). GetTree is UNIMPLEMENTED unless get_tree."""

    def __init__(self, served: dict[dg.Digest, bytes], *, get_tree: bool = True) -> None:
        self.served = {(d.hash, d.size): data for d, data in served.items()}
        self.get_tree = get_tree
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.stall_after: int | None = None
        self.stalled = asyncio.Event()
        self.message_size = MiB
        self.message_delay = 0.0
        self.break_after = 0
        self.breaks = 0
        self.ignore_offset = False
        self.read_offsets: list[int] = []
        self.resume = asyncio.Event()

    def _note(self, method: str, context) -> None:
        self.calls.append((method, dict(context.invocation_metadata() or ())))

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]

    async def GetCapabilities(self, request, context):
        self._note("GetCapabilities", context)
        return server_capabilities()

    async def BatchReadBlobs(self, request, context):
        self._note("BatchReadBlobs", context)
        reply = re_pb2.BatchReadBlobsResponse()
        for pb in request.digests:
            data = self.served.get((pb.hash, pb.size_bytes))
            entry = reply.responses.add(digest=pb)
            if data is None:
                entry.status.code = code_pb2.NOT_FOUND
            else:
                entry.data = data
        return reply

    async def Read(self, request, context):
        self._note("Read", context)
        h, size = request.resource_name.split("/")[-2:]
        data = self.served.get((h, int(size)))
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such blob")
        self.read_offsets.append(request.read_offset)
        offset = 0 if self.ignore_offset else request.read_offset
        size = self.message_size
        for n, start in enumerate(range(offset, len(data), size)):
            if self.breaks and n == self.break_after:
                self.breaks -= 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (fake)")
            if n == self.stall_after:
                self.stalled.set()
                await self.resume.wait()
            if self.message_delay:
                await asyncio.sleep(self.message_delay)
            yield bs_pb2.ReadResponse(data=data[start:start + size])

    async def GetTree(self, request, context):
        self._note("GetTree", context)
        if not self.get_tree:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no GetTree here")
        # Every directory parsed (so re-serialized on the wire), two per page, one stream.
        pending, out, seen = [request.root_digest], [], set()
        while pending:
            pb = pending.pop(0)
            data = self.served.get((pb.hash, pb.size_bytes))
            if data is None or (pb.hash, pb.size_bytes) in seen:
                continue
            seen.add((pb.hash, pb.size_bytes))
            directory = re_pb2.Directory.FromString(data)
            out.append(directory)
            pending += [child.digest for child in directory.directories]
        for start in range(0, len(out), 2):
            token = str(start + 2) if start + 2 < len(out) else ""
            yield re_pb2.GetTreeResponse(directories=out[start:start + 2], next_page_token=token)


@asynccontextmanager
async def fake_cas(served: dict[dg.Digest, bytes], **options) -> AsyncIterator[
        tuple[FakeCas, str]]:
    fake = FakeCas(served, **options)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    re_grpc.add_ContentAddressableStorageServicer_to_server(fake, server)
    re_grpc.add_CapabilitiesServicer_to_server(fake, server)
    bs_grpc.add_ByteStreamServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        fake.resume.set()
        await server.stop(0)


# ---- trees ---------------------------------------------------------------------------------


NESTED = {
    "README": b"top",
    "src": {"main.c": b"int main;", "lib": {"a.c": b"a", "b.c": b"b", "deep": {"x": b"x"}}},
    "empty": {},
    "docs": {"guide.md": b"guide", "lib": {"a.c": b"a", "b.c": b"b", "deep": {"x": b"x"}}},
}


@pytest.mark.parametrize("function", [dg.SHA256, dg.BLAKE3])
def test_nested_tree_comes_in_one_gettree(server, store, function):
    tree = build_tree(NESTED, FN_ENUM[function])
    blobs = {dg.Digest(function, h, n): data for (h, n), data in tree.blobs.items()}
    upload(server.address, function, blobs)
    directories = {dg.of_bytes(function, d.SerializeToString()) for d in tree.directories}
    assert len(directories) == 6  # the shared lib/ subtree is one Directory
    root = dg.Digest(function, tree.root.hash, tree.root.size_bytes)
    methods = Methods()

    async def run() -> None:
        async with fetcher_for(server.address, store, methods) as f:
            await f.fetch_tree(function, root, AUTH)
            calls = len(methods.names)
            await f.fetch_tree(function, root, AUTH)  # all local now: no call at all
            assert len(methods.names) == calls

    uvloop.run(run())
    assert methods.names == ["GetTree"]
    for d in directories:
        assert store.read_bytes(d) == blobs[d]
    # Files are fetch_blobs' job, not fetch_tree's.
    assert not store.has(dg.of_bytes(function, b"int main;"))
    assert_clean(store)


def test_tree_falls_back_to_batch_reads_by_digest(tmp_path):
    """A Directory whose wire bytes are not canonical re-serializes to other bytes: GetTree's
    copy cannot be checked, so that one is read by digest. Without GetTree, every level is."""
    leaf = re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=re_pb2.Digest(
        hash=dg.of_bytes(dg.SHA256, b"f").hash, size_bytes=1))])
    leaf_bytes = leaf.SerializeToString()
    leaf_digest = dg.of_bytes(dg.SHA256, leaf_bytes)
    sub = re_pb2.DirectoryNode(name="sub", digest=re_pb2.Digest(
        hash=leaf_digest.hash, size_bytes=leaf_digest.size)).SerializeToString()
    file = re_pb2.FileNode(name="g", digest=re_pb2.Digest(
        hash=dg.of_bytes(dg.SHA256, b"g").hash, size_bytes=1)).SerializeToString()
    # directories (2) before files (1): valid protobuf, not what re-serializing gives.
    odd = b"\x12" + varint(len(sub)) + sub + b"\x0a" + varint(len(file)) + file
    assert re_pb2.Directory.FromString(odd).SerializeToString() != odd
    top = re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="mid", digest=re_pb2.Digest(
        hash=dg.of_bytes(dg.SHA256, odd).hash, size_bytes=len(odd)))]).SerializeToString()
    served = blobs_of(dg.SHA256, top, odd, leaf_bytes)
    root = dg.of_bytes(dg.SHA256, top)

    async def run(tmp: str, get_tree: bool) -> list[str]:
        async with fake_cas(served, get_tree=get_tree) as (fake, address):
            with LocalDiskStore(tmp) as local:
                async with fetcher_for(address, local) as f:
                    await f.fetch_tree(dg.SHA256, root, AUTH)
                for d, data in served.items():
                    assert local.read_bytes(d) == data
                assert_clean(local)
            assert all(md.get("authorization") == "Bearer task-jwt" for _, md in fake.calls)
            return fake.methods()

    with_tree = uvloop.run(run(str(tmp_path / "with-tree"), True))
    assert with_tree == ["GetTree", "GetCapabilities", "BatchReadBlobs"]  # odd alone
    without = uvloop.run(run(str(tmp_path / "without-tree"), False))
    assert without == ["GetTree", "GetCapabilities"] + ["BatchReadBlobs"] * 3  # per level


def test_missing_tree_root_names_it(server, store):
    root = dg.of_bytes(dg.SHA256, re_pb2.Directory(
        symlinks=[re_pb2.SymlinkNode(name="l", target=os.urandom(8).hex())]).SerializeToString())

    with pytest.raises(MissingInputs) as info:
        call(server.address, store, "fetch_tree", dg.SHA256, root)
    assert info.value.digests == [root]


def test_a_subdirectory_the_remote_lacks_is_named(server, store):
    lost_spec = {"g": os.urandom(8)}
    tree = build_tree({"kept": {"f": os.urandom(8)}, "lost": lost_spec})
    sub = build_tree(lost_spec).root
    lost = dg.Digest(dg.SHA256, sub.hash, sub.size_bytes)
    blobs = {dg.Digest(dg.SHA256, h, n): data for (h, n), data in tree.blobs.items()
             if h != lost.hash}
    upload(server.address, dg.SHA256, blobs)
    root = dg.Digest(dg.SHA256, tree.root.hash, tree.root.size_bytes)

    with pytest.raises(MissingInputs) as info:
        call(server.address, store, "fetch_tree", dg.SHA256, root)
    assert info.value.digests == [lost]
    assert store.has(root)  # what GetTree brought is kept


# ---- blobs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("function", [dg.SHA256, dg.BLAKE3])
def test_small_and_large_blobs_land_verified(server, store, function):
    small = [os.urandom(n) for n in (1, 1000, 30_000, 200_000)]
    large = [os.urandom(5 * MiB + 17), os.urandom(9 * MiB)]  # over the 4 MiB batch limit
    blobs = blobs_of(function, *small, *large)
    upload(server.address, function, blobs)
    already = dg.of_bytes(function, small[0])
    store.write_bytes(already, small[0])
    wanted = [*blobs, dg.empty(function), *blobs]  # duplicates and the empty blob
    methods = Methods()
    stats = fetch(server.address, store, function, wanted, methods)
    assert stats == FetchStats(blobs=6, fetched=5, bytes=sum(d.size for d in blobs) - 1,
                               local=1, batches=1, streams=2)
    assert sorted(methods.names) == ["BatchReadBlobs", "GetCapabilities", "Read", "Read"]
    for d, data in blobs.items():
        assert store.read_bytes(d) == data
    assert_clean(store)
    again = fetch(server.address, store, function, wanted)
    assert again == FetchStats(blobs=6, local=6)


def test_small_blobs_are_batched_within_the_servers_limit(server, store):
    blobs = blobs_of(dg.SHA256, *(os.urandom(300_000) for _ in range(40)))  # 12 MB in all
    upload(server.address, dg.SHA256, blobs)
    stats = fetch(server.address, store, dg.SHA256, blobs)
    assert stats.fetched == 40 and stats.streams == 0
    # 4 MiB less headroom per reply: 13 blobs of 300 kB fit, so 4 batches.
    assert stats.batches == 4
    assert_clean(store)


@pytest.mark.parametrize("function", [dg.SHA256, dg.BLAKE3])
def test_blobs_the_remote_lacks_are_named_and_the_rest_stored(server, store, function):
    present = blobs_of(function, os.urandom(500), os.urandom(6 * MiB))
    upload(server.address, function, present)
    absent = list(blobs_of(function, os.urandom(700), os.urandom(5 * MiB)))
    with pytest.raises(MissingInputs) as info:
        fetch(server.address, store, function, [*present, *absent])
    assert set(info.value.digests) == set(absent)
    for d, data in present.items():
        assert store.read_bytes(d) == data
    assert not any(store.has(d) for d in absent)
    status = to_status(info.value)
    assert status.code == code_pb2.FAILED_PRECONDITION
    prefix = "blobs/" if function == dg.SHA256 else "blobs/blake3/"
    assert {(v.type, v.subject) for v in precondition_failure(status).violations} == \
        {("MISSING", f"{prefix}{d.hash}/{d.size}") for d in absent}
    assert_clean(store)


def test_wrong_bytes_from_the_remote_never_reach_the_store(tmp_path):
    good = os.urandom(3000)
    small, large, short = os.urandom(2000), os.urandom(5 * MiB), os.urandom(3 * MiB)
    served = {dg.of_bytes(dg.SHA256, good): good,
              dg.of_bytes(dg.SHA256, small): small[:-1] + bytes([small[-1] ^ 1]),
              dg.of_bytes(dg.SHA256, large): large[:MiB] + os.urandom(4 * MiB),
              dg.of_bytes(dg.SHA256, short): short[:2 * MiB]}  # ends early, cleanly
    corrupt = [d for d in served if d.size != len(good)]

    async def run(local: LocalDiskStore) -> None:
        async with fake_cas(served) as (_, address):
            async with fetcher_for(address, local) as f:
                await f.fetch_blobs(dg.SHA256, list(served), AUTH)

    with LocalDiskStore(str(tmp_path / "cache")) as local:
        with pytest.raises(CorruptRemoteBlob) as info:
            uvloop.run(run(local))
        assert set(info.value.digests) == set(corrupt)
        assert info.value.retryable and to_status(info.value).code == code_pb2.UNAVAILABLE
        assert local.read_bytes(dg.of_bytes(dg.SHA256, good)) == good
        assert not any(local.has(d) for d in corrupt)
        assert_clean(local)


def test_metadata_goes_with_every_call(tmp_path):
    blobs = blobs_of(dg.SHA256, os.urandom(10), os.urandom(3 * MiB + 1))

    async def run(local: LocalDiskStore) -> list[tuple[str, dict[str, str]]]:
        async with fake_cas(blobs) as (fake, address):
            async with fetcher_for(address, local, max_batch_bytes=1 << 20) as f:
                await f.fetch_blobs(dg.SHA256, list(blobs), AUTH)
            return fake.calls

    with LocalDiskStore(str(tmp_path / "cache")) as local:
        calls = uvloop.run(run(local))
    assert sorted(m for m, _ in calls) == ["BatchReadBlobs", "GetCapabilities", "Read"]
    assert all(md.get("authorization") == "Bearer task-jwt" for _, md in calls)


def test_a_cancelled_fetch_leaves_nothing_and_releases_the_lock(tmp_path):
    data = os.urandom(6 * MiB)
    d = dg.of_bytes(dg.SHA256, data)

    async def run(local: LocalDiskStore) -> FetchStats:
        async with fake_cas({d: data}) as (fake, address):
            fake.stall_after = 2
            async with fetcher_for(address, local) as f:
                task = asyncio.ensure_future(f.fetch_blobs(dg.SHA256, [d]))
                await asyncio.wait_for(fake.stalled.wait(), 10)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                fake.stall_after = None
                # The lock is free again (or this would hang): the blob comes in whole.
                return await asyncio.wait_for(f.fetch_blobs(dg.SHA256, [d]), 10)

    with LocalDiskStore(str(tmp_path / "cache")) as local:
        stats = uvloop.run(run(local))
        assert stats.fetched == 1 and local.read_bytes(d) == data
        assert_clean(local)


def test_a_broken_read_goes_on_from_where_it_stopped(tmp_path):
    """A Read that breaks off mid-blob is resumed at the bytes received (read_offset), as
    Bazel's downloads do, and the blob is stored whole; the pause between Reads only grows
    while they bring nothing."""
    data = os.urandom(7 * MiB + 123)
    d = dg.of_bytes(dg.SHA256, data)

    async def run(local: LocalDiskStore) -> tuple[FetchStats, list[int]]:
        async with fake_cas({d: data}) as (fake, address):
            fake.break_after, fake.breaks = 2, 3
            async with fetcher_for(address, local) as f:
                stats = await asyncio.wait_for(f.fetch_blobs(dg.SHA256, [d], AUTH), 20)
            return stats, fake.read_offsets

    with LocalDiskStore(str(tmp_path / "cache")) as local:
        stats, offsets = uvloop.run(run(local))
        assert offsets == [0, 2 * MiB, 4 * MiB, 6 * MiB]
        assert (stats.fetched, stats.streams, stats.resumed) == (1, 1, 3)
        assert local.read_bytes(d) == data
        assert_clean(local)


def test_a_server_that_resumes_at_the_wrong_place_stores_nothing(tmp_path):
    data = os.urandom(5 * MiB)
    d = dg.of_bytes(dg.SHA256, data)

    async def run(local: LocalDiskStore) -> None:
        async with fake_cas({d: data}) as (fake, address):
            fake.break_after, fake.breaks, fake.ignore_offset = 2, 1, True
            async with fetcher_for(address, local) as f:
                await asyncio.wait_for(f.fetch_blobs(dg.SHA256, [d], AUTH), 20)

    with LocalDiskStore(str(tmp_path / "cache")) as local:
        with pytest.raises(CorruptRemoteBlob) as info:
            uvloop.run(run(local))
        assert info.value.digests == [d] and not local.has(d)
        assert_clean(local)


def test_reads_that_break_before_a_byte_give_up_soon(tmp_path):
    """A server whose every Read breaks at once: a few Reads with growing pauses (3.1 s in
    all), then FetchUnavailable naming the blob and what was received."""
    data = os.urandom(5 * MiB)
    d = dg.of_bytes(dg.SHA256, data)

    async def run(local: LocalDiskStore) -> list[int]:
        async with fake_cas({d: data}) as (fake, address):
            fake.break_after, fake.breaks = 0, 1000
            async with fetcher_for(address, local) as f:
                with pytest.raises(FetchUnavailable) as info:
                    await asyncio.wait_for(f.fetch_blobs(dg.SHA256, [d], AUTH), 20)
            assert info.value.digests == [d] and "0 of 5242880 bytes" in str(info.value)
            assert "UNAVAILABLE" in str(info.value)
            return fake.read_offsets

    with LocalDiskStore(str(tmp_path / "cache")) as local:
        t0 = time.monotonic()
        offsets = uvloop.run(run(local))
        assert offsets == [0] * 6 and time.monotonic() - t0 < 10
        assert not local.has(d)
        assert_clean(local)


def test_a_server_that_trickles_and_breaks_is_given_up_on_in_bounded_time(tmp_path):
    """Each Read brings a little, slowly, and breaks: resumed Reads together get the time of
    one Read of the whole blob plus one timeout (here 0.5 + 5.2 + 0.5 s), not a Read's
    time each."""
    data = os.urandom(5 * MiB)
    d = dg.of_bytes(dg.SHA256, data)

    async def run(local: LocalDiskStore) -> list[int]:
        async with fake_cas({d: data}) as (fake, address):
            # 128 KiB every 0.35 s (0.37 MB/s), broken after 2 messages each Read.
            fake.message_size, fake.message_delay = 128 << 10, 0.35
            fake.break_after, fake.breaks = 2, 1000
            async with fetcher_for(address, local, timeout=0.5) as f:
                with pytest.raises(FetchUnavailable) as info:
                    await asyncio.wait_for(f.fetch_blobs(dg.SHA256, [d], AUTH), 30)
            assert info.value.digests == [d] and " of 5242880 bytes received" in str(info.value)
            return fake.read_offsets

    with LocalDiskStore(str(tmp_path / "cache")) as local:
        t0 = time.monotonic()
        offsets = uvloop.run(run(local))
        assert 5.5 < time.monotonic() - t0 < 9
        assert offsets == [n * (256 << 10) for n in range(len(offsets))]
        assert 5 < len(offsets) < 15  # ended by the time, not by the count of Reads
        assert not local.has(d)
        assert_clean(local)


def test_a_read_that_stalls_twice_fails_after_two_timeouts(tmp_path):
    """A Read gone quiet is read on once (a connection that died without a word); quiet
    again, the fetch fails: a server that keeps stalling costs two timeouts, whatever size
    the blob claims."""
    data = os.urandom(5 * MiB)
    d = dg.of_bytes(dg.SHA256, data)

    async def run(local: LocalDiskStore) -> list[int]:
        async with fake_cas({d: data}) as (fake, address):
            fake.stall_after = 1
            async with fetcher_for(address, local, timeout=0.5) as f:
                with pytest.raises(FetchUnavailable) as info:
                    await asyncio.wait_for(f.fetch_blobs(dg.SHA256, [d], AUTH), 30)
            assert "stalled" in str(info.value) and "2 Read(s)" in str(info.value)
            return fake.read_offsets

    with LocalDiskStore(str(tmp_path / "cache")) as local:
        t0 = time.monotonic()
        assert uvloop.run(run(local)) == [0, MiB]
        assert 0.9 < time.monotonic() - t0 < 3
        assert not local.has(d)
        assert_clean(local)


class KillingStore(LocalDiskStore):
    """SIGKILLs kill_pids, in order, once a download has written 3 chunks."""

    kill_pids: tuple[int, ...] = ()

    def write(self, digest, chunks):
        def counted():
            for n, chunk in enumerate(chunks):
                if n == 3:
                    for pid in self.kill_pids:
                        os.kill(pid, signal.SIGKILL)
                yield chunk
        return super().write(digest, counted())


@pytest.mark.slow
def test_remote_going_away_mid_stream_is_retryable_and_leaves_nothing(tmp_path):
    """The whole remote dies mid-download (its supervisor first, so nothing restarts it):
    the Reads that try to go on find nobody, and the fetch fails retryable."""
    process = new_server("fetch-dying")
    try:
        data = os.urandom(64 * MiB)
        d = dg.of_bytes(dg.SHA256, data)
        upload(process.address, dg.SHA256, {d: data})
        with KillingStore(str(tmp_path / "cache")) as local:
            server = server_pid(process)
            local.kill_pids = (process.proc.pid, server)
            with pytest.raises(FetchUnavailable) as info:
                fetch(process.address, local, dg.SHA256, [d], timeout=10)
            assert not os.path.exists(f"/proc/{server}/cmdline") or _zombie(server)
            assert info.value.retryable and info.value.digests == [d]
            assert type(info.value) is FetchUnavailable
            assert to_status(info.value).code == code_pb2.UNAVAILABLE
            assert "bytes received" in str(info.value)
            assert not local.has(d)
            assert_clean(local)
    finally:
        stop_server(process)


class CuttingProxy:
    """A TCP proxy to a real server that cuts its first connection (both ways, at once)
    once it has carried cut_after bytes from the server; later connections pass whole.
    Counts the bytes it carried from the server."""

    def __init__(self, target: str, cut_after: int):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.cut_after = cut_after
        self.carried = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        first = True
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server, False, None),
                             daemon=True).start()
            threading.Thread(target=self._pump, daemon=True, args=(
                server, client, True, self.cut_after if first else None)).start()
            first = False

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool,
              cut: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                sent += len(data)
                if from_server:
                    with self._lock:
                        self.carried += len(data)
                if cut is not None and sent >= cut:
                    with self._lock:
                        self.cuts += 1
                    break
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._listener.close()


def test_a_read_cut_mid_blob_goes_on_from_where_it_stopped_on_a_real_server(server, store):
    """A real `stoker up` behind a proxy that cuts the connection after 24 MiB of a 64 MiB
    blob: a new Read asks for the rest (Stoker's own ByteStream honours read_offset), the
    blob lands whole, and the proxy carried about 64 MiB, not 24 + 64."""
    data = os.urandom(64 * MiB)
    d = dg.of_bytes(dg.SHA256, data)
    upload(server.address, dg.SHA256, {d: data})
    proxy = CuttingProxy(server.address, cut_after=24 * MiB)
    try:
        stats = fetch(proxy.address, store, dg.SHA256, [d], timeout=10)
    finally:
        proxy.close()
    assert proxy.cuts == 1 and (stats.fetched, stats.resumed) == (1, 1)
    assert store.read_bytes(d) == data
    assert 64 * MiB <= proxy.carried < 72 * MiB, proxy.carried
    assert_clean(store)


def test_concurrent_fetches_in_one_process_download_once(server, store):
    data = os.urandom(24 * MiB)
    d = dg.of_bytes(dg.SHA256, data)
    upload(server.address, dg.SHA256, {d: data})

    async def run() -> list[FetchStats]:
        async with fetcher_for(server.address, store) as a, \
                fetcher_for(server.address, store) as b:
            return await asyncio.gather(*(f.fetch_blobs(dg.SHA256, [d]) for f in (a, b, a)))

    stats = uvloop.run(run())
    assert sum(s.fetched for s in stats) == 1 and sum(s.streams for s in stats) == 1
    assert store.read_bytes(d) == data


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


# ---- one download per machine ----------------------------------------------------------------


def _fetch_in_child(root: str, address: str, digests: list[dg.Digest], barrier,
                    results) -> None:
    """A worker process of its own: its own LocalDiskStore on the shared root."""
    with LocalDiskStore(root) as local:
        async def run() -> FetchStats:
            async with fetcher_for(address, local) as f:
                await f.capabilities()  # connected before the race starts
                barrier.wait()
                return await f.fetch_blobs(dg.SHA256, digests)
        results.put(dataclasses.asdict(uvloop.run(run())))


@pytest.mark.slow
def test_two_processes_download_each_blob_once(server, tmp_path):
    large = os.urandom(48 * MiB)
    small = [os.urandom(20_000) for _ in range(300)]
    blobs = blobs_of(dg.SHA256, large, *small)
    upload(server.address, dg.SHA256, blobs)
    root = str(tmp_path / "cache")
    LocalDiskStore(root).close()
    barrier, results = SPAWN.Barrier(2), SPAWN.Queue()
    children = [SPAWN.Process(target=_fetch_in_child,
                              args=(root, server.address, list(blobs), barrier, results))
                for _ in range(2)]
    for c in children:
        c.start()
    stats = [FetchStats(**results.get(timeout=120)) for _ in children]
    for c in children:
        c.join(30)
        assert c.exitcode == 0
    total = FetchStats()
    for s in stats:
        total.add(s)
    # Between the two: every blob downloaded exactly once, one ByteStream Read in all.
    assert total.fetched == len(blobs) and total.bytes == sum(d.size for d in blobs)
    assert total.streams == 1
    assert total.local + total.shared == len(blobs)
    with LocalDiskStore(root) as local:
        for d, data in blobs.items():
            assert local.read_bytes(d) == data
        assert_clean(local)
