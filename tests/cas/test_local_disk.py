"""LocalDiskStore beyond the BlobStore contract: staging by hardlink, eviction, restarts."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import traceback

import pytest

from engine import digest
from engine.cas.index import SharedIndex
from engine.cas.local_disk import LocalDiskStore
from engine.cas.store import BlobNotFound, DigestMismatch
from engine.digest import Digest, DigestError


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "cache")


@pytest.fixture
def store(root):
    s = LocalDiskStore(root)
    yield s
    s.close()


def put(store: LocalDiskStore, data: bytes, function: str = digest.SHA256) -> Digest:
    d = digest.of_bytes(function, data)
    store.write_bytes(d, data)
    return d


def cached_files(root: str) -> list[str]:
    return sorted(os.path.join(dirpath, name)
                  for dirpath, _dirs, names in os.walk(os.path.join(root, "cas"))
                  for name in names)


def leave_dirty(root: str) -> None:
    """Open the store in another process that exits without closing it (like a crash)."""
    code = ("import os, sys\nfrom engine.cas.local_disk import LocalDiskStore\n"
            "LocalDiskStore(sys.argv[1])\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, root], check=True, timeout=30)


def fs_type(path: str) -> str:
    best = ("", "")
    with open("/proc/self/mounts") as f:
        for line in f:
            mount_point, kind = line.split()[1:3]
            if path.startswith(mount_point) and len(mount_point) > len(best[0]):
                best = (mount_point, kind)
    return best[1]


def test_exec_variants_are_separate_read_only_inodes(store, tmp_path):
    d = put(store, b"#!/bin/sh\necho hi\n")
    plain, exe, exe2 = (str(tmp_path / n) for n in ("plain", "exe", "exe2"))
    store.link_into(d, False, plain)
    store.link_into(d, True, exe)
    store.link_into(d, True, exe2)
    sp, se, se2 = os.stat(plain), os.stat(exe), os.stat(exe2)
    assert sp.st_ino != se.st_ino
    assert se.st_ino == se2.st_ino
    assert stat.S_IMODE(sp.st_mode) == 0o444
    assert stat.S_IMODE(se.st_mode) == 0o555
    # The cached non-executable inode is the one linked, and was never chmod-ed.
    cached = os.stat(store.blob_path(d))
    assert cached.st_ino == sp.st_ino and stat.S_IMODE(cached.st_mode) == 0o444
    assert open(exe, "rb").read() == b"#!/bin/sh\necho hi\n"
    assert subprocess.run([exe], capture_output=True).stdout == b"hi\n"
    s = store.stats()
    assert (s["entries"], s["total_bytes"]) == (2, 2 * d.size)


def test_empty_blob_is_never_linked(store, root, tmp_path):
    empty = digest.empty(digest.SHA256)
    names = [str(tmp_path / n) for n in ("e1", "e2", "e3")]
    store.link_into(empty, False, names[0])
    store.link_into(empty, True, names[1])
    store.link_into(empty, False, names[2])
    stats = [os.stat(n) for n in names]
    assert len({s.st_ino for s in stats}) == 3
    assert all(s.st_nlink == 1 and s.st_size == 0 for s in stats)
    assert [stat.S_IMODE(s.st_mode) for s in stats] == [0o444, 0o555, 0o444]
    assert cached_files(root) == []
    with pytest.raises(ValueError, match="empty blob"):
        store.blob_path(empty)


def test_link_into_absent_blob_or_bad_destination(store, tmp_path):
    absent = digest.of_bytes(digest.SHA256, b"not here")
    with pytest.raises(BlobNotFound):
        store.link_into(absent, False, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")
    d = put(store, b"here")
    # A missing destination directory is the caller's error, not a missing blob.
    with pytest.raises(FileNotFoundError):
        store.link_into(d, False, str(tmp_path / "no" / "dir"))
    store.link_into(d, False, str(tmp_path / "x"))
    with pytest.raises(FileExistsError):
        store.link_into(d, False, str(tmp_path / "x"))


def test_malformed_digests_and_arguments_are_rejected(root, store):
    bad = Digest(digest.SHA256, "../../../../etc/passwd", 5)
    with pytest.raises(DigestError):
        store.has(bad)
    with pytest.raises(DigestError):
        store.write_bytes(Digest(digest.SHA256, "AB" * 32, 1), b"x")
    with pytest.raises(ValueError, match="max_size_bytes"):
        LocalDiskStore(root, max_size_bytes=-1)
    with pytest.raises(ValueError, match="low_watermark"):
        LocalDiskStore(root, low_watermark=0)


def test_one_variant_is_made_from_the_other(store, tmp_path):
    src = tmp_path / "tool"
    src.write_bytes(b"\x7fELF pretend")
    d = digest.of_file(digest.BLAKE3, src)
    store.insert_file(d, str(src), move=True, executable=True)
    assert not src.exists()
    store.link_into(d, False, str(tmp_path / "plain"))
    assert stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == 0o444
    assert store.read_bytes(d) == b"\x7fELF pretend"
    assert store.stats()["entries"] == 2


def test_insert_file_moves_only_what_it_may(store, tmp_path):
    data = os.urandom(50_000)
    d = digest.of_bytes(digest.SHA256, data)

    moved = tmp_path / "moved"
    moved.write_bytes(data)
    inode = os.stat(moved).st_ino
    store.insert_file(d, str(moved), move=True)
    assert not moved.exists()
    assert os.stat(store.blob_path(d)).st_ino == inode

    # A file with other links may be an input inode or the user's: copy it, never chmod.
    d2 = digest.of_bytes(digest.SHA256, data[::-1])
    shared = tmp_path / "shared"
    shared.write_bytes(data[::-1])
    os.chmod(shared, 0o644)
    os.link(shared, tmp_path / "other-link")
    store.insert_file(d2, str(shared), move=True)
    assert shared.exists() and stat.S_IMODE(os.stat(shared).st_mode) == 0o644
    assert os.stat(store.blob_path(d2)).st_ino != os.stat(shared).st_ino

    copied = tmp_path / "copied"
    copied.write_bytes(b"copy me")
    d3 = digest.of_bytes(digest.SHA256, b"copy me")
    store.insert_file(d3, str(copied))
    assert copied.read_bytes() == b"copy me" and store.read_bytes(d3) == b"copy me"


def test_insert_file_rejects_wrong_content(store, tmp_path):
    f = tmp_path / "out"
    f.write_bytes(b"actual output")
    wrong = digest.of_bytes(digest.SHA256, b"claimed output")
    with pytest.raises(DigestMismatch):
        store.insert_file(wrong, str(f), move=True)
    with pytest.raises(DigestMismatch):
        store.insert_file(wrong, str(f))
    with pytest.raises(DigestMismatch):  # verify=False still checks the size
        store.insert_file(digest.of_bytes(digest.SHA256, b"other size"), str(f), verify=False)
    assert not store.has(wrong)
    assert f.read_bytes() == b"actual output"
    assert store.stats()["entries"] == 0


def test_link_limit_rotates_to_a_fresh_inode(store, tmp_path):
    d = put(store, b"a popular header")
    store.link_limit = 3
    dests = [str(tmp_path / f"d{i}") for i in range(7)]
    for dest in dests:
        store.link_into(d, False, dest)
    inodes = [os.stat(p).st_ino for p in dests]
    # Each cache inode takes two links before reaching the limit of three.
    assert [inodes.index(i) for i in inodes] == [0, 0, 2, 2, 4, 4, 6]
    assert store.rotations == 3
    assert all(open(p, "rb").read() == b"a popular header" for p in dests)
    assert store.stats()["total_bytes"] == d.size and store.stats()["entries"] == 1


@pytest.mark.slow
def test_real_ext4_link_limit(store, tmp_path):
    if fs_type(str(tmp_path)) != "ext4":
        pytest.skip("needs ext4 (65,000 links per inode)")
    d = put(store, b"__init__")
    links = tmp_path / "links"
    links.mkdir()
    cached = store.blob_path(d)
    n = 0
    try:
        while True:  # fill up to the limit quickly, straight from the cache
            os.link(cached, f"{links}/{n}")
            n += 1
    except OSError as e:
        assert e.errno == 31  # EMLINK
    store.link_into(d, False, str(tmp_path / "one-more"))
    assert store.rotations == 1
    assert os.stat(tmp_path / "one-more").st_nlink == 2
    assert open(tmp_path / "one-more", "rb").read() == b"__init__"
    shutil.rmtree(links)


def test_eviction_goes_to_low_watermark_in_lru_order(root, tmp_path):
    with LocalDiskStore(root, max_size_bytes=10_000, low_watermark=0.5) as store:
        ds = [put(store, bytes([i]) * 1000) for i in range(10)]
        assert store.stats()["evictions"] == 0  # exactly at the limit
        store.touch(ds[0])
        store.read_bytes(ds[1])
        store.link_into(ds[2], False, str(tmp_path / "staged"))
        newest = put(store, b"n" * 1000)
        s = store.stats()
        assert s["total_bytes"] <= 5000
        assert s["evictions"] == 6
        kept = {d for d in [*ds, newest] if os.path.exists(store._path(d, False))}
        assert kept == {ds[0], ds[1], ds[2], newest, ds[9]}
        assert len(cached_files(root)) == 5
        with pytest.raises(BlobNotFound):
            store.link_into(ds[3], False, str(tmp_path / "evicted"))
        # What was staged before the eviction keeps its content.
        assert open(tmp_path / "staged", "rb").read() == bytes([2]) * 1000


def test_blob_larger_than_the_cache_survives_its_own_insert(root):
    with LocalDiskStore(root, max_size_bytes=1000) as store:
        small = put(store, b"s" * 600)
        big = put(store, b"B" * 5000)
        assert store.has(big) and not store.has(small)


def test_fetch_lock_is_single_flight_across_threads(store):
    d = digest.of_bytes(digest.SHA256, b"fetched once")
    fetches = []

    def fetch():
        with store.fetch_lock(d):
            if not store.has(d):
                fetches.append(1)
                time.sleep(0.05)
                store.write_bytes(d, b"fetched once")

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fetches == [1]
    # Another digest is not held up by a fetch in flight.
    other = digest.of_bytes(digest.SHA256, b"other")
    with store.fetch_lock(d):
        done = threading.Event()

        def take_other():
            with store.fetch_lock(other):
                done.set()

        t = threading.Thread(target=take_other)
        t.start()
        assert done.wait(5)
        t.join()


def test_two_instances_in_one_process_share_the_store(root):
    a = LocalDiskStore(root)
    b = LocalDiskStore(root)
    d = put(a, b"shared")
    assert b.has(d) and b.read_bytes(d) == b"shared"
    assert b.stats()["entries"] == 1
    a.close()
    put(b, b"after a closed")
    b.close()
    c = LocalDiskStore(root)
    assert not c.recovered and c.stats()["entries"] == 2
    c.close()


def test_two_stores_closing_at_once_leave_the_index_clean(root):
    """b closes in the window after a has let go of the open lock and before a's lock file
    is closed (as two processes stopping together may): one of them is still the last, so
    the next open finds the index clean (tests/cas/test_multiprocess.py's overlapping
    writers found it 'recovered' about once in ten runs under load)."""
    a = LocalDiskStore(root)
    b = LocalDiskStore(root)
    put(a, b"closing together")
    close_index = a._index.close

    def b_closes_first() -> None:
        b.close()
        close_index()

    a._index.close = b_closes_first  # type: ignore[method-assign]
    a.close()
    with LocalDiskStore(root) as c:
        assert not c.recovered and c.stats()["entries"] == 1


def test_clean_restart_is_fast_and_keeps_entries(root, monkeypatch):
    with LocalDiskStore(root) as store:
        ds = [put(store, b"blob %d" % i) for i in range(200)]
        before = store.stats()

    def no_scan(self, unverified=False):
        raise AssertionError("a clean restart must not scan the cache")

    monkeypatch.setattr(LocalDiskStore, "_scan", no_scan)
    started = time.perf_counter()
    store = LocalDiskStore(root)
    elapsed = time.perf_counter() - started
    try:
        assert elapsed < 0.5
        assert not store.recovered
        after = store.stats()
        assert (after["entries"], after["total_bytes"]) == (before["entries"],
                                                           before["total_bytes"])
        assert after["unverified"] == 0
        assert all(store.read_bytes(d) == b"blob %d" % i for i, d in enumerate(ds))
    finally:
        store.close()


def test_dirty_restart_rebuilds_and_drops_truncated_and_corrupt(root, tmp_path):
    good, truncated, corrupt = (os.urandom(20_000) for _ in range(3))
    with LocalDiskStore(root) as store:
        dg, dt, dc = (put(store, data) for data in (good, truncated, corrupt))
        store.link_into(dg, True, str(tmp_path / "exe"))
        paths = {d: store.blob_path(d) for d in (dg, dt, dc)}
    leave_dirty(root)
    for d, damage in ((dt, b""), (dc, os.urandom(20_000))):
        os.chmod(paths[d], 0o644)  # we play a disk fault; the store never does this
        with open(paths[d], "r+b") as f:
            if damage:
                f.write(damage)
            else:
                f.truncate(10_000)
    open(os.path.join(root, "tmp", "12345.0"), "wb").write(b"half a download")
    junk = os.path.join(os.path.dirname(paths[dg]), "junk")
    open(junk, "wb").write(b"?")

    with LocalDiskStore(root) as store:
        assert store.recovered
        s = store.stats()
        assert s["entries"] == 3 and s["unverified"] == 3  # good, good -x, corrupt
        assert os.listdir(os.path.join(root, "tmp")) == []
        assert not os.path.exists(junk)
        assert not store.has(dt)
        with pytest.raises(BlobNotFound):
            store.read_bytes(dt)
        # The corrupt blob has the right size: it is caught when first read.
        with pytest.raises(BlobNotFound):
            store.read_bytes(dc)
        assert not store.has(dc)
        assert store.read_bytes(dg) == good
        store.link_into(dg, True, str(tmp_path / "exe2"))
        s = store.stats()
        assert s["entries"] == 2 and s["unverified"] == 0
        assert s["total_bytes"] == 2 * len(good)
        # A fresh write of the dropped blob is accepted again.
        store.write_bytes(dc, corrupt)
        assert store.read_bytes(dc) == corrupt


def test_reboot_since_the_clean_close_rebuilds(root):
    with LocalDiskStore(root) as store:
        d = put(store, b"written before the reboot")
    # Rewrite the clean close as if it had happened in another boot of the kernel.
    fd = os.open(os.path.join(root, "lock"), os.O_RDWR)
    index = SharedIndex(os.path.join(root, "index"), fd, lambda: [])
    assert index.clean
    index.set_clean(True, b"another boot id!")
    index.close()
    os.close(fd)
    with LocalDiskStore(root) as store:
        assert store.recovered
        assert store.stats()["unverified"] == 1
        assert store.read_bytes(d) == b"written before the reboot"
        assert store.stats()["unverified"] == 0


def test_fresh_write_replaces_an_unverified_copy(root):
    data = os.urandom(4096)
    with LocalDiskStore(root) as store:
        d = put(store, data)
        path = store.blob_path(d)
    leave_dirty(root)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"\0" * 4096)
    with LocalDiskStore(root) as store:
        store.write_bytes(d, data)  # e.g. a client uploading it again
        assert store.stats()["unverified"] == 0
        assert store.read_bytes(d) == data
        assert stat.S_IMODE(os.stat(store.blob_path(d)).st_mode) == 0o444


def test_threads_stage_write_and_evict_at_once(root, tmp_path):
    blobs = {digest.of_bytes(digest.SHA256, data): data
             for data in (os.urandom(3000 + i) for i in range(60))}
    ordered = list(blobs)
    errors: list[str] = []
    with LocalDiskStore(root, max_size_bytes=60_000, low_watermark=0.5) as store:

        def work(n: int) -> None:
            try:
                for i in range(80):
                    d = ordered[(n * 7 + i * 13) % len(ordered)]
                    dest = str(tmp_path / f"t{n}-{i}")
                    for _ in range(20):
                        try:
                            store.link_into(d, i % 2 == 1, dest)
                            break
                        except BlobNotFound:
                            with store.fetch_lock(d):
                                if not store.has(d):
                                    store.write_bytes(d, blobs[d])
                    with open(dest, "rb") as f:
                        assert f.read() == blobs[d]
            except BaseException:
                errors.append(traceback.format_exc())

        threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        s = store.stats()
        assert s["evictions"] > 0 and s["total_bytes"] <= 60_000
        files = cached_files(root)
        assert s["entries"] == len(files)
        assert s["total_bytes"] == sum(os.path.getsize(f) for f in files)
