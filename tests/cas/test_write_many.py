"""LocalDiskStore.write_many: many small blobs per call, each verified before it is visible."""

from __future__ import annotations

import os
import stat

import pytest

from engine import digest
from engine.cas.local_disk import LocalDiskStore
from engine.cas.store import DigestMismatch
from engine.digest import Digest, DigestError


@pytest.fixture
def store(tmp_path):
    s = LocalDiskStore(str(tmp_path / "cache"), max_size_bytes=0)
    yield s
    s.close()


def blob(n: int, function: str = digest.SHA256) -> tuple[Digest, bytes]:
    data = os.urandom(n)
    return digest.of_bytes(function, data), data


def test_many_blobs_land_with_their_names_and_modes(store):
    blobs = [blob(1 + 37 * i) for i in range(300)]  # more than one publish group
    blobs.append(blob(500, digest.BLAKE3))
    assert store.write_many(blobs) == [None] * len(blobs)
    for d, data in blobs:
        assert store.read_bytes(d) == data
        path = store.blob_path(d)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o444
    assert store.stats()["entries"] == len(blobs)
    assert os.listdir(os.path.join(store.root, "tmp")) == []


def test_bad_blobs_are_refused_one_by_one(store):
    good = blob(100)
    wrong_hash = (blob(100)[0], os.urandom(100))
    wrong_size = (digest.Digest(digest.SHA256, good[0].hash, 99), good[1])
    malformed = (Digest(digest.SHA256, "zz" * 32, 3), b"abc")
    empty = blob(0)
    again = blob(10)
    errors = store.write_many([good, wrong_hash, wrong_size, malformed, empty, again, again])
    assert errors[0] is None and errors[4] is None and errors[5] is None and errors[6] is None
    assert isinstance(errors[1], DigestMismatch)
    assert isinstance(errors[2], DigestMismatch) and "size differs" in str(errors[2])
    assert isinstance(errors[3], DigestError)
    assert store.read_bytes(good[0]) == good[1]
    assert store.read_bytes(again[0]) == again[1]
    assert store.find_missing([wrong_hash[0], wrong_size[0]]) == [wrong_hash[0],
                                                                   wrong_size[0]]
    assert store.stats()["entries"] == 2
    assert os.listdir(os.path.join(store.root, "tmp")) == []


def test_blobs_already_present_are_kept_and_not_rewritten(store):
    d, data = blob(4000)
    store.write_bytes(d, data)
    inode = os.stat(store.blob_path(d)).st_ino
    assert store.write_many([(d, data)]) == [None]
    assert os.stat(store.blob_path(d)).st_ino == inode
    assert store.stats()["entries"] == 1


def test_eviction_runs_after_a_batch(tmp_path):
    s = LocalDiskStore(str(tmp_path / "small"), max_size_bytes=50_000, low_watermark=0.5)
    try:
        blobs = [blob(1000) for _ in range(200)]
        assert s.write_many(blobs) == [None] * 200
        assert s.stats()["total_bytes"] <= 50_000
        # The most recent blob survives its own batch's eviction.
        assert s.read_bytes(blobs[-1][0]) == blobs[-1][1]
    finally:
        s.close()
