"""The BlobStore contract (engine/cas/store.py), run against every implementation.

To cover a new store, add a factory to STORES.
"""

from __future__ import annotations

import os
import threading

import pytest

from engine import digest
from engine.cas.local_disk import LocalDiskStore
from engine.cas.memory import MemoryStore
from engine.cas.store import BlobNotFound, DigestMismatch
from tests.cas.remote_support import remote_store

STORES = {
    "memory": lambda tmp_path: MemoryStore(),
    "local_disk": lambda tmp_path: LocalDiskStore(str(tmp_path / "cache")),
    "remote": remote_store,  # a real `engine up`, shared by every test
}


@pytest.fixture(params=sorted(STORES))
def store(request, tmp_path):
    s = STORES[request.param](tmp_path)
    yield s
    s.close()


@pytest.fixture(params=[digest.SHA256, digest.BLAKE3])
def function(request):
    return request.param


def blob(function: str, data: bytes) -> digest.Digest:
    return digest.of_bytes(function, data)


def test_write_then_read_back(store, function):
    data = os.urandom(3 * (1 << 20) + 17)  # several read chunks and a ragged end
    d = blob(function, data)
    assert not store.has(d)
    store.write(d, [data[:1000], data[1000:2_000_000], data[2_000_000:]])
    assert store.has(d)
    assert store.read_bytes(d) == data
    assert b"".join(store.read(d)) == data


def test_write_bytes_and_rewrite_is_idempotent(store, function):
    d = blob(function, b"hello world")
    store.write_bytes(d, b"hello world")
    store.write_bytes(d, b"hello world")
    assert store.read_bytes(d) == b"hello world"


@pytest.mark.parametrize("offset,limit,expected", [
    (0, 0, b"0123456789"),
    (3, 0, b"3456789"),
    (3, 4, b"3456"),
    (8, 100, b"89"),
    (10, 0, b""),
    (0, 1, b"0"),
])
def test_read_ranges(store, function, offset, limit, expected):
    d = blob(function, b"0123456789")
    store.write_bytes(d, b"0123456789")
    assert b"".join(store.read(d, offset, limit)) == expected


def test_offset_past_end_is_rejected(store, function):
    d = blob(function, b"0123456789")
    store.write_bytes(d, b"0123456789")
    with pytest.raises(ValueError, match="past the end"):
        list(store.read(d, 11))
    with pytest.raises(ValueError, match="negative"):
        list(store.read(d, -1))
    with pytest.raises(ValueError, match="negative"):
        list(store.read(d, 0, -5))


def test_missing_blob_raises_blob_not_found(store, function):
    d = blob(function, b"never written")
    assert not store.has(d)
    with pytest.raises(BlobNotFound) as info:
        store.read_bytes(d)
    assert info.value.digest == d
    with pytest.raises(BlobNotFound):
        list(store.read(d))


def test_find_missing(store, function):
    present = [blob(function, b"a"), blob(function, b"b")]
    # Unique: the remote store's server is shared with other tests, which may store b"c".
    absent = [blob(function, os.urandom(32)), blob(function, os.urandom(32))]
    for d, data in zip(present, [b"a", b"b"], strict=True):
        store.write_bytes(d, data)
    empty = digest.empty(function)
    asked = [absent[0], present[0], empty, absent[1], present[1], absent[0]]
    assert store.find_missing(asked) == absent
    assert store.find_missing([]) == []


def test_empty_blob_is_always_present(store, function):
    empty = digest.empty(function)
    assert store.has(empty)
    assert store.find_missing([empty]) == []
    assert store.read_bytes(empty) == b""
    assert b"".join(store.read(empty)) == b""
    store.write(empty, [])
    store.write_bytes(empty, b"")
    with pytest.raises(ValueError):
        list(store.read(empty, 1))


def test_mismatched_content_is_rejected_and_not_visible(store, function):
    d = blob(function, b"the real content")
    with pytest.raises(DigestMismatch):
        store.write_bytes(d, b"the fake content")  # same size, other hash
    with pytest.raises(DigestMismatch):
        store.write_bytes(d, b"short")
    with pytest.raises(DigestMismatch):
        store.write(d, [b"the real content", b" and more"])
    assert not store.has(d)
    with pytest.raises(BlobNotFound):
        store.read_bytes(d)
    empty = digest.empty(function)
    with pytest.raises(DigestMismatch):
        store.write_bytes(empty, b"x")
    # The right content still goes in after the failures.
    store.write_bytes(d, b"the real content")
    assert store.read_bytes(d) == b"the real content"


def test_mismatch_against_an_existing_blob_is_still_rejected(store, function):
    d = blob(function, b"stored")
    store.write_bytes(d, b"stored")
    with pytest.raises(DigestMismatch):
        store.write_bytes(d, b"STORED")
    assert store.read_bytes(d) == b"stored"


def test_failed_stream_leaves_nothing(store, function):
    data = b"x" * 100_000
    d = blob(function, data)

    def chunks():
        yield data[:50_000]
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.write(d, chunks())
    assert not store.has(d)


def test_concurrent_writers_of_one_blob(store, function):
    data = os.urandom(200_000)
    d = blob(function, data)
    errors = []

    def put():
        try:
            store.write(d, [data[i:i + 8192] for i in range(0, len(data), 8192)])
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.read_bytes(d) == data
