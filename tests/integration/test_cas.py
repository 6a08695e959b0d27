"""Capabilities, the CAS service and ByteStream of a running Stoker, over real gRPC."""

from __future__ import annotations

import os
import uuid

import grpc
import pytest
import zstandard

from engine.proto import bs_pb2, re_pb2
from tests.integration.support import (
    BLAKE3,
    MAX_BATCH,
    SHA256,
    blob_resource,
    build_tree,
    digest_of,
    key,
)


def unique(n: int = 64) -> bytes:
    """Content no other test has stored."""
    head = uuid.uuid4().bytes
    return head + os.urandom(max(0, n - len(head)))


def test_capabilities(client):
    caps = client.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest(), timeout=10)
    cache = caps.cache_capabilities
    assert set(cache.digest_functions) == {SHA256, BLAKE3}
    assert cache.max_batch_total_size_bytes == MAX_BATCH
    assert cache.action_cache_update_capabilities.update_enabled
    assert re_pb2.Compressor.ZSTD in cache.supported_compressors
    assert cache.symlink_absolute_path_strategy == re_pb2.SymlinkAbsolutePathStrategy.DISALLOWED
    ex = caps.execution_capabilities
    assert ex.exec_enabled
    assert ex.digest_function == SHA256
    assert set(ex.digest_functions) == {SHA256, BLAKE3}
    assert (caps.low_api_version.major, caps.high_api_version.major) == (2, 2)


def test_find_missing_blobs(client):
    present, absent = unique(), unique()
    client.put(present)
    empty = digest_of(b"")
    missing = client.missing([digest_of(present), digest_of(absent), empty])
    # The empty blob is always present.
    assert missing == {key(digest_of(absent))}


def test_batch_update_and_read(client):
    blobs = [unique(10), unique(1000), unique(100_000), b""]
    digests = client.upload(blobs)
    reply = client.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=[*digests, digest_of(b"never uploaded " + unique())]), timeout=10)
    assert [r.status.code for r in reply.responses] == [0, 0, 0, 0, grpc.StatusCode.NOT_FOUND
                                                        .value[0]]
    assert [r.data for r in reply.responses[:4]] == blobs
    assert [key(r.digest) for r in reply.responses[:4]] == [key(d) for d in digests]
    assert "not found" in reply.responses[4].status.message


def test_blake3_batches_are_a_separate_namespace(client):
    data = unique(500)
    b3 = digest_of(data, BLAKE3)
    client.upload([data], BLAKE3)
    assert client.read(b3, BLAKE3) == data
    assert client.missing([b3], BLAKE3) == set()
    # The same bytes under SHA-256 were never uploaded.
    assert client.missing([digest_of(data)], SHA256) == {key(digest_of(data))}
    # The BLAKE3 hash read as a SHA-256 digest names another (absent) blob.
    reply = client.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[b3]), timeout=10)
    assert reply.responses[0].status.code == grpc.StatusCode.NOT_FOUND.value[0]
    # And ByteStream names the function in the path.
    assert client.bs_read(blob_resource(b3, BLAKE3)) == data


def _nested_spec(width: int, depth: int, tag: bytes) -> dict:
    if depth == 0:
        return {"leaf.txt": tag}
    return {f"d{i}": _nested_spec(width, depth - 1, tag + b"/%d" % i) for i in range(width)}


def test_get_tree_pages_and_resumes(client):
    spec = _nested_spec(width=3, depth=2, tag=unique(16))  # 1 + 3 + 9 = 13 distinct dirs
    tree = client.put_tree(spec)
    expected = {d.SerializeToString() for d in tree.directories}
    assert len(expected) == 13

    pages = list(client.cas.GetTree(re_pb2.GetTreeRequest(root_digest=tree.root, page_size=4),
                                    timeout=10))
    assert [len(p.directories) for p in pages] == [4, 4, 4, 1]
    assert all(p.next_page_token for p in pages[:-1]) and pages[-1].next_page_token == ""
    got = [d for p in pages for d in p.directories]
    assert got[0].SerializeToString() == tree.directories[0].SerializeToString()  # root first
    assert {d.SerializeToString() for d in got} == expected
    assert len(got) == 13

    # Resume from the token of the first page: the rest, and nothing of the first page.
    rest = list(client.cas.GetTree(re_pb2.GetTreeRequest(
        root_digest=tree.root, page_size=4, page_token=pages[0].next_page_token), timeout=10))
    resumed = [d.SerializeToString() for p in rest for d in p.directories]
    assert resumed == [d.SerializeToString() for d in got[4:]]

    with pytest.raises(grpc.RpcError) as e:
        list(client.cas.GetTree(re_pb2.GetTreeRequest(root_digest=tree.root,
                                                      page_token="bogus"), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in e.value.details()

    with pytest.raises(grpc.RpcError) as e:
        list(client.cas.GetTree(re_pb2.GetTreeRequest(
            root_digest=digest_of(b"no such directory " + unique())), timeout=10))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "root_digest" in e.value.details()


def test_get_tree_blake3(client):
    tree = client.put_tree({"a": {"x": unique(8)}, "b": unique(8)}, BLAKE3)
    pages = list(client.cas.GetTree(re_pb2.GetTreeRequest(
        root_digest=tree.root, digest_function=BLAKE3), timeout=10))
    got = {d.SerializeToString() for p in pages for d in p.directories}
    assert got == {d.SerializeToString() for d in tree.directories}


# ---- ByteStream ----------------------------------------------------------------------------


def test_bytestream_read_ranges(client):
    data = unique(3000)
    d = client.put(data)
    name = blob_resource(d)
    assert client.bs_read(name) == data
    assert client.bs_read(name, offset=1000) == data[1000:]
    assert client.bs_read(name, offset=10, limit=25) == data[10:35]
    assert client.bs_read(name, limit=2999) == data[:2999]
    assert client.bs_read(name, offset=3000) == b""
    # An instance name prefix is accepted.
    assert client.bs_read(blob_resource(d, instance="main/ci")) == data

    with pytest.raises(grpc.RpcError) as e:
        client.bs_read(name, offset=3001)
    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "read_offset 3001" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.bs_read(name, offset=-1)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "read_offset" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.bs_read(name, limit=-5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "read_limit" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.bs_read(blob_resource(digest_of(unique())))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_bytestream_chunked_write_and_large_blob(client):
    data = unique(10 * 1024 * 1024 + 12345)  # over the batch limit: ByteStream only
    d = digest_of(data)
    step = 1 << 20
    chunks = [data[i:i + step] for i in range(0, len(data), step)]
    assert len(chunks) == 11
    reply = client.bs_write(blob_resource(d, upload=str(uuid.uuid4())), chunks)
    assert reply.committed_size == len(data)
    assert client.missing([d]) == set()
    assert client.bs_read(blob_resource(d)) == data
    assert client.bs_read(blob_resource(d), offset=5 * step, limit=10) == data[5 * step:][:10]
    status = client.bs.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(
        resource_name=blob_resource(d, upload=str(uuid.uuid4()))), timeout=10)
    assert status.complete and status.committed_size == len(data)
    # Writing it again ends at once with the full size, as the spec allows.
    again = client.bs_write(blob_resource(d, upload=str(uuid.uuid4())), chunks[:1],
                            finish=False)
    assert again.committed_size == len(data)


def test_bytestream_resumed_write(client):
    data = unique(300_000)
    d = digest_of(data)
    name = blob_resource(d, upload=str(uuid.uuid4()))
    status = client.bs.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name),
                                        timeout=10)
    assert (status.committed_size, status.complete) == (0, False)

    # The first stream ends without finish_write: the server says so, and keeps the bytes.
    with pytest.raises(grpc.RpcError) as e:
        client.bs_write(name, [data[:100_000], data[100_000:120_000]], finish=False)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "finish_write" in e.value.details()
    status = client.bs.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name),
                                        timeout=10)
    assert (status.committed_size, status.complete) == (120_000, False)
    assert client.missing([d]) == {key(d)}

    reply = client.bs_write(name, [data[120_000:200_000], data[200_000:]], start=120_000)
    assert reply.committed_size == len(data)
    status = client.bs.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name),
                                        timeout=10)
    assert (status.committed_size, status.complete) == (len(data), True)
    assert client.bs_read(blob_resource(d)) == data


def test_bytestream_zstd_write_and_read(client):
    data = unique(64) * 4000  # compressible
    d = digest_of(data)
    compressed = zstandard.ZstdCompressor().compress(data)
    assert len(compressed) < len(data) // 10
    third = len(compressed) // 3
    chunks = [compressed[:third], compressed[third:2 * third], compressed[2 * third:]]
    reply = client.bs_write(blob_resource(d, compressed=True, upload=str(uuid.uuid4())), chunks)
    assert reply.committed_size == len(compressed)
    # Stored uncompressed under its digest...
    assert client.read(d) == data
    # ...and served compressed on request.
    got = client.bs_read(blob_resource(d, compressed=True))
    assert zstandard.ZstdDecompressor().decompressobj().decompress(got) == data

    with pytest.raises(grpc.RpcError) as e:
        client.bs_read(blob_resource(d, compressed=True), limit=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "read_limit" in e.value.details()


def test_bytestream_zstd_blake3(client):
    data = unique(32) * 100
    d = digest_of(data, BLAKE3)
    compressed = zstandard.ZstdCompressor().compress(data)
    client.bs_write(blob_resource(d, BLAKE3, compressed=True, upload=str(uuid.uuid4())),
                    [compressed])
    assert client.read(d, BLAKE3) == data
    got = client.bs_read(blob_resource(d, BLAKE3, compressed=True))
    assert zstandard.ZstdDecompressor().decompressobj().decompress(got) == data


def test_tree_helper_matches_get_tree_order():
    # A sanity check of the helper the other tests rely on: sorted entries, root first.
    tree = build_tree({"b": b"2", "a": b"1", "z": {"y": b"3"}})
    root = tree.directories[0]
    assert [f.name for f in root.files] == ["a", "b"]
    assert [d.name for d in root.directories] == ["z"]
    assert digest_of(root.SerializeToString()) == tree.root
