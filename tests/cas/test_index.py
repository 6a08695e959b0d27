"""The shared index table on its own: probing, deletion, growth, reset and torn repair."""

from __future__ import annotations

import os
import random

import pytest

from engine.cas.index import (
    FLAG_UNVERIFIED,
    MIN_CAPACITY,
    IndexFull,
    Record,
    SharedIndex,
    entry_key,
)


@pytest.fixture
def lock_fd(tmp_path):
    fd = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT)
    yield fd
    os.close(fd)


def open_index(tmp_path, lock_fd, scan=lambda: []) -> SharedIndex:
    index = SharedIndex(str(tmp_path / "index"), lock_fd, scan)
    if not index.valid:
        index.initialize(MIN_CAPACITY)
    return index


def test_keys_differ_by_every_part():
    h = "ab" * 32
    keys = {
        entry_key("sha256", h, 10, False),
        entry_key("sha256", h, 10, True),
        entry_key("sha256", h, 11, False),
        entry_key("blake3", h, 10, False),
        entry_key("sha256", "cd" * 32, 10, False),
    }
    assert len(keys) == 5 and 0 not in keys


def test_random_inserts_and_removes_match_a_dict(tmp_path, lock_fd):
    rng = random.Random(7)
    index = open_index(tmp_path, lock_fd)
    model: dict[int, int] = {}
    with index.locked():
        for _ in range(6000):
            # Dense small keys cluster into long probe chains that wrap around the table.
            key = rng.choice((rng.randrange(1, 400), rng.randrange(3900, 4500)))
            if key in model and rng.random() < 0.5:
                e = index.remove(index.find(key))
                assert e.key == key and e.size == model.pop(key)
            else:
                size = rng.randrange(1, 1000)
                added = index.insert(key, size, 0, bytes(32))
                assert added == (key not in model)
                model.setdefault(key, size)
        for key, size in model.items():
            slot = index.find(key)
            assert slot >= 0 and index.entry(slot).size == size
        assert index.entry_count == len(model)
        assert index.total_bytes == sum(model.values())
        assert index.find(0x7777_7777) == -1
    index.close()


def test_grows_past_load_factor_and_other_openers_follow(tmp_path, lock_fd):
    index = open_index(tmp_path, lock_fd)
    other = SharedIndex(str(tmp_path / "index"), lock_fd, lambda: [])
    keys = [entry_key("sha256", f"{i:064x}", i + 1, False) for i in range(MIN_CAPACITY)]
    with index.locked():
        for i, key in enumerate(keys):
            index.insert(key, i + 1, 0, bytes(32))
    assert index.capacity > MIN_CAPACITY
    with other.locked():  # remaps to the grown table
        assert other.capacity == index.capacity
        assert all(other.find(k) >= 0 for k in keys)
        assert other.entry_count == len(keys)
    other.close()
    index.close()


def test_lru_order_follows_touches(tmp_path, lock_fd):
    index = open_index(tmp_path, lock_fd)
    with index.locked():
        for key in (11, 22, 33):
            index.insert(key, 1, 0, bytes(32))
        index.touch_many([11])
        index.touch(22)
    order = [row[0] for row in sorted(index.snapshot(), key=lambda row: row[2])]
    assert order == [33, 11, 22]
    index.close()


def test_reset_ranks_records_and_counts_unverified(tmp_path, lock_fd):
    index = open_index(tmp_path, lock_fd)
    records = [Record(5, 50, FLAG_UNVERIFIED, bytes(32), 3),
               Record(6, 60, 0, bytes(32), 1),
               Record(7, 70, FLAG_UNVERIFIED, bytes(32), 2)]
    with index.locked():
        index.reset(records)
        assert (index.entry_count, index.total_bytes, index.unverified) == (3, 180, 2)
        index.mark_verified(index.find(5))
        assert index.unverified == 1
        index.remove(index.find(7))
        assert index.unverified == 0
    order = [row[0] for row in sorted(index.snapshot(), key=lambda row: row[2])]
    assert order == [6, 5]
    index.close()


def test_holder_dying_mid_update_triggers_repair(tmp_path, lock_fd):
    scanned = [Record(1, 10, 0, bytes(32), 0), Record(2, 20, 0, bytes(32), 0)]
    index = open_index(tmp_path, lock_fd, scan=lambda: list(scanned))
    with index.locked():
        index.insert(1, 10, FLAG_UNVERIFIED, bytes(32))
        index.insert(3, 30, 0, bytes(32))  # a file that is gone from disk
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        child = SharedIndex(str(tmp_path / "index"), lock_fd, lambda: [])
        with child.locked():
            os._exit(0)  # dies holding the lock with the busy flag set
    os.waitpid(pid, 0)
    with index.locked():
        assert index.find(3) == -1 and index.find(2) >= 0
        assert index.total_bytes == 30
        # The torn table's unverified mark survives the repair.
        assert index.entry(index.find(1)).unverified
    assert index.repairs == 1
    index.close()


def test_full_table_refuses_cleanly(tmp_path, lock_fd, monkeypatch):
    monkeypatch.setattr("engine.cas.index.MAX_CAPACITY", MIN_CAPACITY)
    index = open_index(tmp_path, lock_fd)
    inserted = []
    with index.locked():
        with pytest.raises(IndexFull, match="cannot grow"):
            for i in range(MIN_CAPACITY):
                key = entry_key("sha256", f"{i:064x}", 1, False)
                index.insert(key, 1, 0, bytes(32))
                inserted.append(key)
        assert len(inserted) * 20 > MIN_CAPACITY * 18
        assert all(index.find(k) >= 0 for k in inserted)
        assert index.entry_count == len(inserted)
    # Still usable: removing makes room again.
    with index.locked():
        index.remove(index.find(inserted[0]))
        index.insert(inserted[0], 1, 0, bytes(32))
    index.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_an_index_that_does_not_fit_the_disk_is_an_error_not_sigbus(tmp_path):
    """A sparse index file on a full disk would kill the process with SIGBUS at the first
    write to a new page; its blocks are allocated up front, so it is ENOSPC instead."""
    import errno
    import subprocess
    import sys

    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        code = ("import sys\nfrom engine.cas.local_disk import LocalDiskStore\n"
                "try:\n    LocalDiskStore(sys.argv[1], 10 * 1024**3)\n"
                "except OSError as e:\n    print(e.errno)\n")
        done = subprocess.run([sys.executable, "-c", code, str(mnt / "cache")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr  # not -7 (SIGBUS)
        assert done.stdout.strip() == str(errno.ENOSPC)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
