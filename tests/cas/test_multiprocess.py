"""LocalDiskStore shared by real processes: concurrent use, single flight, kills, restarts."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest
from cas_workers import (
    blob_data,
    blob_digest,
    churn,
    fetch_each_once,
    insert_and_read,
    stage_while_evicting,
    write_and_wait,
    write_forever,
)

from engine import hashing
from engine.cas.local_disk import LocalDiskStore
from engine.cas.store import BlobNotFound

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "cache")


def run_all(*procs, timeout: float = 30) -> None:
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            pytest.fail(f"{p.name} hung")
    assert [p.exitcode for p in procs] == [0] * len(procs)


def start_and_kill(target, args, ready_path: str) -> None:
    """Run target in a child, SIGKILL it once it has created ready_path."""
    p = SPAWN.Process(target=target, args=args)
    p.start()
    deadline = time.monotonic() + 20
    while not os.path.exists(ready_path):
        assert p.is_alive(), "child died before it was ready"
        assert time.monotonic() < deadline, "child never got ready"
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert p.exitcode == -signal.SIGKILL


def check_cache_consistent(store: LocalDiskStore) -> int:
    """Every file under cas/ holds the content its name promises; accounting matches."""
    files = sizes = 0
    for dirpath, _dirs, names in os.walk(os.path.join(store.root, "cas")):
        function = os.path.relpath(dirpath, os.path.join(store.root, "cas")).split("/")[0]
        for name in names:
            h, size = name.split("-")[:2]
            actual = hashing.hash_file(function, os.path.join(dirpath, name))
            assert actual == (h, int(size)), f"{name} holds other content"
            files += 1
            sizes += int(size)
    stats = store.stats()
    assert (stats["entries"], stats["total_bytes"]) == (files, sizes)
    return files


def test_processes_insert_and_read_overlapping_blobs(root):
    barrier = SPAWN.Barrier(4)
    run_all(*(SPAWN.Process(target=insert_and_read, args=(root, seed, barrier))
              for seed in range(4)))
    with LocalDiskStore(root) as store:
        assert not store.recovered
        files = check_cache_consistent(store)
        assert 0 < files <= 2 * 60


def test_fetch_lock_gives_one_fetch_per_digest_across_processes(root, tmp_path):
    log_path = str(tmp_path / "fetches")
    barrier = SPAWN.Barrier(4)
    run_all(*(SPAWN.Process(target=fetch_each_once, args=(root, 40, log_path, barrier))
              for _ in range(4)))
    with open(log_path) as f:
        fetched = sorted(int(line) for line in f)
    assert fetched == list(range(40))


def test_writer_killed_mid_blob_leaves_nothing_visible(root, tmp_path):
    ready = str(tmp_path / "ready")
    with LocalDiskStore(root) as store:
        start_and_kill(write_forever, (root, ready, "stall"), ready)
        assert os.listdir(os.path.join(root, "tmp")) != []  # the half-written temp file
        assert check_cache_consistent(store) == 0
    with LocalDiskStore(root) as store:  # the next first opener sweeps tmp/
        assert os.listdir(os.path.join(root, "tmp")) == []
        assert store.stats()["entries"] == 0


def test_writer_killed_at_random_leaves_a_consistent_cache(root, tmp_path):
    with LocalDiskStore(root) as store:
        for n in range(3):
            ready = str(tmp_path / f"ready{n}")
            start_and_kill(write_forever, (root, ready, "loop"), ready)
            # Whatever the child was doing, even holding the index lock, this store
            # repairs the index if needed and sees only complete, verified blobs.
            assert check_cache_consistent(store) > 10
        d = blob_digest(1000)
        assert store.read_bytes(d) == blob_data(1000)


@pytest.mark.slow
def test_eviction_while_other_processes_stage(root, tmp_path):
    max_size = 1 << 20
    misses_path = str(tmp_path / "misses")
    barrier = SPAWN.Barrier(4)
    with LocalDiskStore(root, max_size_bytes=max_size) as store:
        for k in range(1, 40):
            store.write_bytes(blob_digest(k), blob_data(k))
    run_all(
        SPAWN.Process(target=churn, args=(root, max_size, 10_000, 2.0, barrier)),
        SPAWN.Process(target=churn, args=(root, max_size, 20_000, 2.0, barrier)),
        SPAWN.Process(target=stage_while_evicting,
                      args=(root, max_size, 1, 2.0, misses_path, barrier)),
        SPAWN.Process(target=stage_while_evicting,
                      args=(root, max_size, 2, 2.0, misses_path, barrier)),
    )
    with open(misses_path) as f:
        misses = [int(line) for line in f]
    assert len(misses) == 2  # both stagers finished; each miss was fetched again
    with LocalDiskStore(root, max_size_bytes=max_size) as store:
        check_cache_consistent(store)
        assert store.stats()["total_bytes"] <= max_size


def cache_path(root: str, d, executable: bool = False) -> str:
    suffix = "-x" if executable else ""
    return f"{root}/cas/{d.function}/{d.hash[:2]}/{d.hash}-{d.size}{suffix}"


def test_restart_after_sigkill_recovers(root, tmp_path):
    ready = str(tmp_path / "ready")
    start_and_kill(write_and_wait, (root, 30, ready), ready)
    truncated, corrupt = blob_digest(3), blob_digest(5)
    for path, damage in ((cache_path(root, truncated), None),
                         (cache_path(root, corrupt), os.urandom(corrupt.size)),
                         (cache_path(root, corrupt, True), os.urandom(corrupt.size))):
        os.chmod(path, 0o644)  # playing a disk fault
        with open(path, "r+b") as f:
            if damage is None:
                f.truncate(truncated.size - 1)
            else:
                f.write(damage)

    started = time.perf_counter()
    with LocalDiskStore(root) as store:
        assert store.recovered
        assert time.perf_counter() - started < 5
        assert store.stats()["unverified"] == 59  # 30 blobs and their -x copies, less one
        assert not os.path.exists(cache_path(root, truncated))
        # Both copies of the corrupt blob are caught on first use, and it reads as missing.
        assert store.has(corrupt)
        with pytest.raises(BlobNotFound):
            store.read_bytes(corrupt)
        assert not store.has(corrupt)
        with pytest.raises(BlobNotFound):
            store.link_into(corrupt, True, str(tmp_path / "corrupt"))
        for k in range(30):
            if k != 5:
                assert store.read_bytes(blob_digest(k)) == blob_data(k)
                store.link_into(blob_digest(k), True, str(tmp_path / f"again{k}"))
        # The truncated blob's executable copy was intact: it serves reads meanwhile.
        store.link_into(truncated, False, str(tmp_path / "restored"))
        assert os.path.exists(cache_path(root, truncated))
        check_cache_consistent(store)
        assert store.stats()["unverified"] == 0
    with LocalDiskStore(root) as store:
        assert not store.recovered and store.stats()["entries"] == 58
