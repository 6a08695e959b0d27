"""The remote CAS client (engine/cas/remote.py, uploader.py) against a real `engine up`.

Uploads run through both transports (sync RemoteStore.upload and the grpc.aio
AsyncUploader); a client interceptor records what went on the wire, so the tests can count
RPCs and measure the batches the server really received.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import blake3
import grpc
import pytest
import uvloop

from engine import digest as dg
from engine.cas.remote import RemoteStore
from engine.cas.remote_wire import (
    CasCapabilities,
    RemoteCasError,
    UploadError,
    batch_base_size,
    batch_entry_size,
    encode_batch,
    write_frame,
)
from engine.cas.store import BlobNotFound, DigestMismatch
from engine.cas.uploader import AsyncUploader
from engine.proto import bs_pb2, re_pb2
from tests.cas.remote_support import new_server, shared_server, stop_server

MiB = 1 << 20
FIND = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"
BATCH = "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs"
WRITE = "/google.bytestream.ByteStream/Write"
CAPS = "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities"


# ---- recording what goes on the wire -------------------------------------------------------


class Recorder:
    """(method, request) of every unary call; (WRITE, first WriteRequest) of every Write.
    after_frames(n, fn) runs fn once a Write has sent n frames (to break a stream)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.break_after: tuple[int, object] | None = None
        self.all_missing = False  # answer FindMissingBlobs as if nothing were stored

    def of(self, method: str) -> list:
        return [r for m, r in self.calls if m == method]

    def note_unary(self, method: str | bytes, request):
        method = _name(method)
        if isinstance(request, bytes):  # BatchUpdateBlobs goes out encoded by hand
            parsed = re_pb2.BatchUpdateBlobsRequest.FromString(request)
            assert parsed.SerializeToString(deterministic=True) == request, "not canonical"
            request = parsed
        self.calls.append((method, request))
        if method == FIND and self.all_missing:
            return re_pb2.FindMissingBlobsResponse(missing_blob_digests=request.blob_digests)
        return None

    def frames(self, method: str | bytes, requests) -> Iterator:
        for i, frame in enumerate(requests):
            self.note_frame(method, i, frame)
            yield frame

    async def async_frames(self, method: str | bytes, requests) -> AsyncIterator:
        i = 0
        async for frame in requests:
            self.note_frame(method, i, frame)
            i += 1
            yield frame

    def note_frame(self, method: str | bytes, i: int, frame: bytes) -> None:
        if i == 0:
            self.calls.append((_name(method), bs_pb2.WriteRequest.FromString(frame)))
        if self.break_after and i == self.break_after[0]:
            self.break_after[1]()


def _name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method  # grpc.aio passes bytes


class _Done:
    """What a sync unary continuation returns, for a faked answer."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value

    def exception(self):
        return None


class SyncInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    def __init__(self, recorder: Recorder):
        self.r = recorder

    def intercept_unary_unary(self, continuation, details, request):
        fake = self.r.note_unary(details.method, request)
        return _Done(fake) if fake is not None else continuation(details, request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(details, self.r.frames(details.method, request_iterator))


class AsyncUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, recorder: Recorder):
        self.r = recorder

    async def intercept_unary_unary(self, continuation, details, request):
        fake = self.r.note_unary(details.method, request)
        if fake is not None:
            return fake
        return await continuation(details, request)


class AsyncStream(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, recorder: Recorder):
        self.r = recorder

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        # The uploader sends plain frames as an iterator, compressed ones as an async one.
        wrap = self.r.async_frames if hasattr(request_iterator, "__aiter__") else self.r.frames
        return await continuation(details, wrap(details.method, request_iterator))


def upload(flavor: str, address: str, items, recorder: Recorder | None = None,
           parallel: int = 4, **options):
    """Upload items with the chosen transport; returns its UploadStats."""
    recorder = recorder or Recorder()
    if flavor == "sync":
        options["max_streams"] = parallel
        channel = grpc.intercept_channel(grpc.insecure_channel(address),
                                         SyncInterceptor(recorder))
        try:
            return RemoteStore(channel, **options).upload(items)
        finally:
            channel.close()

    options["max_in_flight"] = parallel

    async def run():
        async with grpc.aio.insecure_channel(
                address, interceptors=[AsyncUnary(recorder), AsyncStream(recorder)]) as ch:
            return await AsyncUploader(ch, **options).upload(items)

    return uvloop.run(run())


# ---- fixtures and data ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture
def store(server) -> Iterator[RemoteStore]:
    s = RemoteStore.connect(server.address)
    yield s
    s.close()


@pytest.fixture(params=["sync", "async"])
def flavor(request) -> str:
    return request.param


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def item_of(function: str, source) -> tuple[dg.Digest, object]:
    if isinstance(source, bytes):
        return dg.of_bytes(function, source), source
    return dg.of_file(function, source), str(source)


def content(source) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


# ---- wire encoding ------------------------------------------------------------------------


@pytest.mark.parametrize("offset,resource,finish,data", [
    (0, "uploads/u/blobs/" + "a" * 64 + "/5", False, b"hello"),
    (300, "", False, b"x" * 200),
    (1 << 40, "", True, b"tail"),
    (5, "", True, b""),
])
def test_frames_are_canonical_write_requests(offset, resource, finish, data):
    frame = write_frame(memoryview(data), offset, resource, finish)
    expected = bs_pb2.WriteRequest(resource_name=resource, write_offset=offset,
                                   finish_write=finish, data=data)
    assert bs_pb2.WriteRequest.FromString(frame) == expected
    assert frame == expected.SerializeToString(deterministic=True)


@pytest.mark.parametrize("instance,function", [("", dg.SHA256), ("main/ci", dg.BLAKE3)])
def test_batches_are_canonical_batch_update_requests(instance, function):
    blobs = [b"", b"x", os.urandom(200), os.urandom(70_000)]
    entries = [(dg.of_bytes(function, b), b) for b in blobs]
    encoded = encode_batch(instance, function, entries, 1 << 20)
    expected = re_pb2.BatchUpdateBlobsRequest(
        instance_name=instance, digest_function=dg.ENUM_BY_FUNCTION[function],
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(
            digest=re_pb2.Digest(hash=d.hash, size_bytes=d.size), data=b)
            for d, b in entries])
    assert encoded == expected.SerializeToString(deterministic=True)
    # plan() sizes batches with ByteSize(); the encoding must agree to the byte.
    assert len(encoded) == batch_base_size(instance, function) + sum(
        batch_entry_size(d) for d, _ in entries)
    with pytest.raises(AssertionError, match="exceeds"):
        encode_batch(instance, function, entries, len(encoded) - 1)


def test_capabilities_are_read_once(server):
    recorder = Recorder()
    channel = grpc.intercept_channel(grpc.insecure_channel(server.address),
                                     SyncInterceptor(recorder))
    s = RemoteStore(channel)
    caps = s.capabilities()
    s.find_missing([dg.of_bytes("sha256", b"1")])
    s.capabilities()
    channel.close()
    assert caps == CasCapabilities(4 << 20, frozenset({"sha256", "blake3"}),
                                   frozenset({"zstd"}), 0)
    assert len(recorder.of(CAPS)) == 1
    with pytest.raises(ValueError, match="function"):
        RemoteStore(grpc.insecure_channel(server.address), function="md5")


# ---- uploads --------------------------------------------------------------------------------


@pytest.mark.parametrize("function", [dg.SHA256, dg.BLAKE3])
def test_small_and_large_uploads_land_intact(server, store, flavor, function, tmp_path):
    sources = [os.urandom(n) for n in (8, 1000, 20_000, 300_000)]  # >1 byte: unique
    sources += [random_file(tmp_path / f"small{i}", 5000 + i) for i in range(20)]
    sources += [random_file(tmp_path / "large", 6 * MiB + 123),  # several 1 MiB frames
                os.urandom(4 * MiB + 1)]  # bytes too big for a batch
    items = [item_of(function, s) for s in sources]
    recorder = Recorder()
    stats = upload(flavor, server.address, items + [item_of(function, b"")], recorder,
                   function=function)
    assert (stats.blobs, stats.missing, stats.streams) == (len(items), len(items), 2)
    assert stats.bytes == sum(d.size for d, _ in items)
    writes = recorder.of(WRITE)
    prefix = "blobs/blake3/" if function == dg.BLAKE3 else "blobs/"
    assert len(writes) == 2
    assert all(w.resource_name.split("/", 2)[2].startswith(prefix) for w in writes)
    for (d, _), src in zip(items, sources, strict=True):
        assert store.read_bytes(d) == content(src)
    large, big_bytes = items[-2][0], items[-1][0]
    assert b"".join(store.read(large, 5 * MiB, 1000)) == content(sources[-2])[5 * MiB:5 * MiB
                                                                                 + 1000]
    assert b"".join(store.read(big_bytes)) == sources[-1]


def test_blake3_resource_names_name_the_function(server, store, tmp_path):
    data = os.urandom(5 * MiB)
    d = dg.of_bytes(dg.BLAKE3, data)
    assert d.hash == blake3.blake3(data).hexdigest()
    recorder = Recorder()
    upload("sync", server.address, [(d, data)], recorder, function=dg.BLAKE3)
    [write] = recorder.of(WRITE)
    assert write.resource_name.endswith(f"/blobs/blake3/{d.hash}/{d.size}")
    # The SHA-256 digest of the same bytes is another blob, which nobody uploaded.
    assert store.find_missing([dg.of_bytes(dg.SHA256, data)]) == [dg.of_bytes(dg.SHA256, data)]
    assert store.read_bytes(d) == data


def test_find_missing_skips_present_blobs(server, flavor, tmp_path):
    first = [item_of("sha256", os.urandom(3000 + i)) for i in range(30)]
    first.append(item_of("sha256", random_file(tmp_path / "a", 5 * MiB)))
    upload(flavor, server.address, first)
    second = [item_of("sha256", os.urandom(3000 + i)) for i in range(5)]
    second.append(item_of("sha256", random_file(tmp_path / "b", 5 * MiB)))
    recorder = Recorder()
    stats = upload(flavor, server.address, first + second + first[:3], recorder)
    assert (stats.blobs, stats.missing, stats.batches, stats.streams) == (37, 6, 1, 1)
    [find] = recorder.of(FIND)
    assert len(find.blob_digests) == 37
    [batch] = recorder.of(BATCH)
    assert {r.digest.hash for r in batch.requests} == {d.hash for d, _ in second[:5]}
    [write] = recorder.of(WRITE)
    assert second[5][0].hash in write.resource_name
    recorder = Recorder()
    assert upload(flavor, server.address, first + second, recorder).missing == 0
    assert [m for m, _ in recorder.calls] == [CAPS, FIND]


def test_find_missing_is_batched_by_ten_thousand(server):
    run = os.urandom(8).hex()  # the server is shared: other tests may hold b"1" and such
    digests = [dg.of_bytes("sha256", f"{run}-{i}".encode()) for i in range(25_000)]
    recorder = Recorder()
    channel = grpc.intercept_channel(grpc.insecure_channel(server.address),
                                     SyncInterceptor(recorder))
    try:
        missing = RemoteStore(channel).find_missing(digests + digests[:10])
    finally:
        channel.close()
    assert missing == digests
    assert [len(r.blob_digests) for r in recorder.of(FIND)] == [10_000, 10_000, 5_000]


def _sizes_for(budget: int, count: int) -> list[int]:
    """Blob sizes whose BatchUpdateBlobsRequest serializes to exactly budget bytes, found by
    asking protobuf (the digest's hash text does not change the size)."""
    def serialized(sizes: list[int]) -> int:
        return re_pb2.BatchUpdateBlobsRequest(
            digest_function=re_pb2.DigestFunction.SHA256,
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(
                digest=re_pb2.Digest(hash="0" * 64, size_bytes=n), data=b"\0" * n)
                for n in sizes]).ByteSize()
    sizes = [budget // count] * count
    sizes[-1] -= serialized(sizes) - budget
    while serialized(sizes) != budget:  # a varint boundary; move one byte elsewhere
        sizes[0] -= 1
        sizes[-1] -= serialized(sizes) - budget
    return sizes


@pytest.mark.parametrize("over", [0, 1])
def test_batches_just_under_and_just_over_the_limit(server, store, flavor, over):
    budget = store.batch_budget  # the advertised 4 MiB less headroom
    assert 4 * MiB - 128 * 1024 <= budget < 4 * MiB
    sizes = _sizes_for(budget, 4)
    sizes[1] += over
    blobs = [os.urandom(n) for n in sizes]
    recorder = Recorder()
    stats = upload(flavor, server.address, [item_of("sha256", b) for b in blobs], recorder)
    sizes = [b.ByteSize() for b in recorder.of(BATCH)]
    if over:
        assert len(sizes) == 2 and max(sizes) < budget
    else:
        assert sizes == [budget]
    assert (stats.batches, stats.streams) == (1 + over, 0)
    for b in blobs:
        assert store.read_bytes(dg.of_bytes("sha256", b)) == b


def test_max_batch_bytes_caps_the_serialized_request(server, flavor):
    blobs = [os.urandom(700 + i) for i in range(400)]
    recorder = Recorder()
    stats = upload(flavor, server.address, [item_of("sha256", b) for b in blobs], recorder,
                   max_batch_bytes=50_000)
    sizes = sorted(b.ByteSize() for b in recorder.of(BATCH))
    assert len(sizes) == stats.batches >= 7
    # Every batch but the last is full: the next blob (< 1200 bytes framed) did not fit.
    assert sizes[-1] <= 50_000 and sizes[1] > 50_000 - 1200
    assert sum(len(b.requests) for b in recorder.of(BATCH)) == 400
    # A blob that cannot fit such a batch on its own is streamed.
    big = os.urandom(60_000)
    recorder = Recorder()
    upload(flavor, server.address, [item_of("sha256", big)], recorder, max_batch_bytes=50_000)
    assert [m for m, _ in recorder.calls] == [CAPS, FIND, WRITE]


# ---- compression ----------------------------------------------------------------------------


def test_zstd_is_used_where_it_pays(server, store, flavor, tmp_path):
    text = tmp_path / "log.txt"
    with open(text, "w") as f:
        f.write(f"build {os.urandom(8).hex()}\n")  # the server is shared: a new blob each run
        for i in range(300_000):
            f.write(f"line {i}: compiling module_{i % 977}.cc with -O2 -g\n")
    noise = random_file(tmp_path / "noise", 5 * MiB)
    items = [item_of("sha256", text), item_of("sha256", noise)]
    recorder = Recorder()
    stats = upload(flavor, server.address, items, recorder)
    assert (stats.streams, stats.compressed_streams) == (2, 1)
    names = {w.resource_name.split("/")[2]: w.resource_name for w in recorder.of(WRITE)}
    assert names["compressed-blobs"].endswith(f"zstd/{items[0][0].hash}/{items[0][0].size}")
    assert names["blobs"].endswith(f"/{items[1][0].hash}/{items[1][0].size}")
    assert store.read_bytes(items[0][0]) == text.read_bytes()
    assert store.read_bytes(items[1][0]) == noise.read_bytes()


@pytest.mark.parametrize("mode,compressors,compressed", [
    ("never", None, 0), ("always", None, 1), ("always", (), 0)])
def test_compression_can_be_forced_or_refused(server, store, mode, compressors, compressed):
    data = os.urandom(5 * MiB)  # incompressible: 'auto' would never compress it
    recorder = Recorder()
    stats = upload("async", server.address, [item_of("sha256", data)], recorder,
                   compress=mode, compressors=compressors)
    assert stats.compressed_streams == compressed
    [write] = recorder.of(WRITE)
    assert ("compressed-blobs/zstd/" in write.resource_name) == bool(compressed)
    assert store.read_bytes(dg.of_bytes("sha256", data)) == data
    with pytest.raises(ValueError, match="compress"):
        RemoteStore(grpc.insecure_channel(server.address), compress="sometimes")
    with pytest.raises(ValueError, match="compressors"):
        RemoteStore(grpc.insecure_channel(server.address), compressors=["brotli"])


def test_a_write_someone_else_finished_first_is_success(server, store, flavor, tmp_path):
    """Between FindMissingBlobs and the Write, the blob appears: the server ends the write
    early (committed_size = size, or -1 when compressed) and that is success."""
    plain = random_file(tmp_path / "plain", 6 * MiB)
    packed = tmp_path / "packed"
    packed.write_bytes(b"abc" * (2 * MiB))
    items = [item_of("sha256", plain), item_of("sha256", packed)]
    upload(flavor, server.address, items)
    recorder = Recorder()
    recorder.all_missing = True
    stats = upload(flavor, server.address, items, recorder)
    assert (stats.missing, stats.streams, stats.compressed_streams) == (2, 2, 1)
    assert len(recorder.of(WRITE)) == 2


# ---- failures ---------------------------------------------------------------------------------


def test_failed_uploads_name_each_blob(server, store, flavor, tmp_path):
    good_small = os.urandom(1000)
    good_large = random_file(tmp_path / "good", 5 * MiB)
    lying_small = os.urandom(2000)
    lying_large = random_file(tmp_path / "lying", 5 * MiB)
    gone = random_file(tmp_path / "gone", 3000)
    shrunk = random_file(tmp_path / "shrunk", 5 * MiB)
    bad_small = dg.make("sha256", hashlib.sha256(b"other").hexdigest(), len(lying_small))
    bad_large = dg.make("sha256", hashlib.sha256(b"other").hexdigest(), 5 * MiB)
    items = [item_of("sha256", good_small), item_of("sha256", good_large),
             (bad_small, lying_small), (bad_large, str(lying_large)),
             item_of("sha256", gone), item_of("sha256", shrunk)]
    gone.unlink()
    shrunk.write_bytes(b"short")
    with pytest.raises(UploadError) as info:
        upload(flavor, server.address, items)
    failed = {f.digest: f for f in info.value.failures}
    assert set(failed) == {bad_small, bad_large, items[4][0], items[5][0]}
    assert "INVALID_ARGUMENT" in failed[bad_large].reason
    assert failed[bad_large].source == str(lying_large)
    assert "status 3" in failed[bad_small].reason  # INVALID_ARGUMENT in the batch entry
    assert "No such file" in failed[items[4][0]].reason
    assert "digest says" in failed[items[5][0]].reason
    message = str(info.value)
    assert message.startswith("4 of 6 blob(s) failed to upload")
    assert str(bad_large) in message and str(gone) in message
    assert store.read_bytes(items[0][0]) == good_small
    assert store.read_bytes(items[1][0]) == good_large.read_bytes()
    assert store.find_missing([bad_small, bad_large]) == [bad_small, bad_large]


def server_pid(process) -> int:
    """The pid of the `engine server` child of a Stoker supervisor."""
    pid = process.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(c) for c in f.read().split()]
    for child in children:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if f.read().split(b"\0")[2:4] == [b"engine", b"server"]:
                return child
    raise AssertionError(f"no server process among {children}")


@pytest.mark.slow  # 2-30 s: waits for a killed server's stream to break
def test_a_stream_broken_by_a_dying_server_reports_the_blob(flavor, tmp_path):
    process = new_server(f"dying-{flavor}")
    try:
        big = random_file(tmp_path / "big", 24 * MiB)
        small = os.urandom(100)
        recorder = Recorder()
        # SIGKILL the server process itself (the supervisor would let it drain its calls).
        pid = server_pid(process)
        recorder.break_after = (3, lambda: os.kill(pid, signal.SIGKILL))
        with pytest.raises(UploadError) as info:
            upload(flavor, process.address, [item_of("sha256", big), item_of("sha256", small)],
                   recorder, parallel=1)
        failures = {f.digest: f for f in info.value.failures}
        big_digest = dg.of_file("sha256", big)
        assert big_digest in failures
        assert failures[big_digest].source == str(big)
        assert "ByteStream Write failed: UNAVAILABLE" in failures[big_digest].reason
    finally:
        stop_server(process)


def test_an_unreachable_server_is_a_clear_error(tmp_path):
    from tests.integration.support import free_port

    store = RemoteStore.connect(f"127.0.0.1:{free_port()}", timeout=2.0)
    with pytest.raises(RemoteCasError, match="GetCapabilities failed: UNAVAILABLE"):
        store.upload([item_of("sha256", b"x")])
    store.close()


# ---- the BlobStore side: verified streamed writes and reads --------------------------------------


def test_large_write_is_verified_before_it_finishes(server, store):
    data = os.urandom(9 * MiB + 5)
    d = dg.of_bytes("sha256", data)
    wrong = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(DigestMismatch):
        store.write(d, [wrong[i:i + 700_000] for i in range(0, len(wrong), 700_000)])
    assert not store.has(d)
    with pytest.raises(BlobNotFound):
        store.read_bytes(d)

    def failing() -> Iterator[bytes]:
        yield data[:3 * MiB]
        raise ConnectionError("the producer went away")

    with pytest.raises(ConnectionError):
        store.write(d, failing())
    assert not store.has(d)
    store.write(d, [data[:100], data[100:5 * MiB], data[5 * MiB:]])
    assert store.read_bytes(d) == data
    # Already stored: the server ends the write early, and the content is still checked.
    store.write(d, [data])
    with pytest.raises(DigestMismatch):
        store.write(d, [wrong])
    assert b"".join(store.read(d, 9 * MiB, 0)) == data[9 * MiB:]


def test_reads_refuse_content_that_does_not_match(server, store):
    """Corrupt the server's stored copy (same size, one bit): the client must never hand
    the wrong bytes back, whether the server notices (NOT_FOUND) or not (DigestMismatch)."""
    for size in (3000, 6 * MiB):  # BatchReadBlobs, then ByteStream Read
        data = os.urandom(size)
        d = dg.of_bytes("sha256", data)
        store.write_bytes(d, data)
        [path] = [p for p in (server.data_dir).rglob(d.hash + "*") if p.is_file()]
        path.chmod(0o644)
        with open(path, "r+b") as f:
            f.seek(size // 2)
            byte = f.read(1)
            f.seek(size // 2)
            f.write(bytes([byte[0] ^ 1]))
        with pytest.raises((DigestMismatch, BlobNotFound)):
            store.read_bytes(d)
        with pytest.raises((DigestMismatch, BlobNotFound)):
            b"".join(store.read(d))


def test_empty_blob_needs_no_rpc(server):
    recorder = Recorder()
    channel = grpc.intercept_channel(grpc.insecure_channel(server.address),
                                     SyncInterceptor(recorder))
    s = RemoteStore(channel)
    empty = dg.empty("sha256")
    assert s.find_missing([empty]) == []
    assert s.read_bytes(empty) == b""
    s.write_bytes(empty, b"")
    assert s.upload([(empty, b"")]).blobs == 0
    channel.close()
    assert [m for m, _ in recorder.calls] == [CAPS]


def test_async_uploader_shares_its_loop(server, tmp_path):
    """Several uploads at once on one event loop, each a mix of batches and streams."""
    sets = [[item_of("sha256", os.urandom(2000 + 10 * k + i)) for i in range(50)]
            + [item_of("sha256", random_file(tmp_path / f"f{k}", 5 * MiB + k))]
            for k in range(4)]

    async def run():
        async with grpc.aio.insecure_channel(server.address) as ch:
            uploader = AsyncUploader(ch)
            return await asyncio.gather(*(uploader.upload(s) for s in sets))

    results = uvloop.run(run())
    assert [r.missing for r in results] == [51] * 4
    store = RemoteStore.connect(server.address)
    try:
        assert store.find_missing(d for s in sets for d, _ in s) == []
    finally:
        store.close()


def test_upload_files_digests_in_slices_and_uploads_each(server, tmp_path):
    """Outputs are digested slice by slice, each slice's upload starting while the next is
    hashed; every file lands under the digest returned for it."""
    paths = [str(random_file(tmp_path / f"o{i}", 1000 + 37 * i)) for i in range(30)]
    paths.append(str(random_file(tmp_path / "big", 6 * MiB + 5)))  # too big for a batch
    paths.append(paths[3])  # the same file twice
    recorder = Recorder()

    async def run():
        async with grpc.aio.insecure_channel(
                server.address, interceptors=[AsyncUnary(recorder), AsyncStream(recorder)]) as ch:
            uploader = AsyncUploader(ch)
            return await uploader.upload_files(paths, slice_files=8, slice_bytes=1 << 20)

    digests, stats = uvloop.run(run())
    assert digests == [dg.of_file(dg.SHA256, p) for p in paths]
    # Slices of 8 small files (the last one partial), the big file alone (it exceeds
    # slice_bytes), then the repeated small file: one FindMissingBlobs each.
    assert len(recorder.of(FIND)) == 6
    assert stats.streams == 1 and stats.missing >= 31
    store = RemoteStore.connect(server.address)
    try:
        assert store.find_missing(digests) == []
        assert store.read_bytes(digests[7]) == Path(paths[7]).read_bytes()
    finally:
        store.close()


def test_upload_files_reports_a_vanished_file(server, tmp_path):
    present = str(random_file(tmp_path / "here", 100))

    async def run():
        async with grpc.aio.insecure_channel(server.address) as ch:
            return await AsyncUploader(ch).upload_files([present, str(tmp_path / "gone")])

    with pytest.raises(FileNotFoundError):
        uvloop.run(run())
