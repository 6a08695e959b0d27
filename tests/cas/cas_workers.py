"""Process bodies for test_multiprocess.py (spawned children import this module).

Every child raises on anything wrong, so a nonzero exit code is a failed check.
"""

from __future__ import annotations

import hashlib
import os
import random
import time

from engine import digest
from engine.cas.local_disk import LocalDiskStore
from engine.cas.store import BlobNotFound
from engine.digest import Digest


def blob_data(k: int) -> bytes:
    """Deterministic content for blob number k: mostly small, every 16th one large."""
    seed = hashlib.sha256(b"blob %d" % k).digest()
    return seed * (10_000 if k % 16 == 0 else k % 64 + 1)


def blob_digest(k: int) -> Digest:
    return digest.of_bytes(digest.SHA256, blob_data(k))


def check_content(path: str, k: int) -> None:
    with open(path, "rb") as f:
        if f.read() != blob_data(k):
            raise AssertionError(f"{path} does not hold blob {k}")


def insert_and_read(root: str, seed: int, barrier) -> None:
    rng = random.Random(seed)
    stage = os.path.join(root, "..", f"stage-{seed}")
    os.makedirs(stage)
    with LocalDiskStore(root) as store:
        barrier.wait()
        for i in range(150):
            k = rng.randrange(60)  # the processes share most of these blobs
            d = blob_digest(k)
            store.write_bytes(d, blob_data(k))
            if store.read_bytes(d) != blob_data(k):
                raise AssertionError(f"read back blob {k} differs")
            j = rng.randrange(60)
            if store.has(blob_digest(j)):
                dest = os.path.join(stage, str(i))
                store.link_into(blob_digest(j), j % 2 == 0, dest)
                check_content(dest, j)


def fetch_each_once(root: str, count: int, log_path: str, barrier) -> None:
    with LocalDiskStore(root) as store:
        barrier.wait()
        for k in range(count):
            d = blob_digest(k)
            with store.fetch_lock(d):
                if store.has(d):
                    continue
                with open(log_path, "a") as log:
                    log.write(f"{k}\n")
                time.sleep(0.005)  # a download, long enough for others to pile up
                store.write_bytes(d, blob_data(k))


def write_forever(root: str, ready_path: str, mode: str) -> None:
    """Write blobs until killed; 'stall' stops mid-blob, 'loop' keeps writing new blobs."""
    store = LocalDiskStore(root)
    if mode == "stall":
        data = os.urandom(1 << 20)
        d = digest.of_bytes(digest.SHA256, data + data)

        def chunks():
            yield data
            open(ready_path, "w").close()
            time.sleep(3600)
            yield data

        store.write(d, chunks())
    k = 1000
    while True:
        store.write_bytes(blob_digest(k), blob_data(k))
        if k == 1010:
            open(ready_path, "w").close()
        k += 1


def write_and_wait(root: str, count: int, ready_path: str) -> None:
    store = LocalDiskStore(root)
    for k in range(count):
        store.write_bytes(blob_digest(k), blob_data(k))
        store.link_into(blob_digest(k), True, os.path.join(root, "..", f"x{k}"))
    open(ready_path, "w").close()
    time.sleep(3600)


def churn(root: str, max_size: int, first: int, seconds: float, barrier) -> None:
    """Write a stream of new blobs, pushing the cache over its limit again and again."""
    with LocalDiskStore(root, max_size_bytes=max_size, low_watermark=0.7) as store:
        barrier.wait()
        k = first
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            store.write_bytes(blob_digest(k), blob_data(k))
            k += 1
        if store.stats()["evictions"] == 0:
            raise AssertionError("the cache never evicted: the test proves nothing")


def stage_while_evicting(root: str, max_size: int, seed: int, seconds: float,
                         misses_path: str, barrier) -> None:
    """Stage blobs by hardlink while others evict; a miss is fetched again and retried."""
    rng = random.Random(seed)
    stage = os.path.join(root, "..", f"stage-{seed}")
    os.makedirs(stage)
    misses = 0
    with LocalDiskStore(root, max_size_bytes=max_size, low_watermark=0.7) as store:
        barrier.wait()
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            k = rng.randrange(1, 40)
            d = blob_digest(k)
            dest = os.path.join(stage, str(i))
            i += 1
            for _ in range(20):
                try:
                    store.link_into(d, k % 3 == 0, dest)
                    break
                except BlobNotFound:
                    misses += 1
                    with store.fetch_lock(d):
                        if not store.has(d):
                            store.write_bytes(d, blob_data(k))
            else:
                raise AssertionError(f"blob {k} kept disappearing")
            check_content(dest, k)
            os.unlink(dest)
    with open(misses_path, "a") as f:
        f.write(f"{misses}\n")
