"""LocalDiskStore: the content-addressed store on local disk shared by every process.

Layout under root:
  cas/<function>/<hh>/<hash>-<size>     content, mode 0444
  cas/<function>/<hh>/<hash>-<size>-x   the same content as a separate inode, mode 0555
  tmp/<pid>.<n>                         temp files, on the same filesystem as cas/
  index                                 the shared index (engine/cas/index.py)
  lock                                  byte-range locks (fdlock.py): 0 index, 1 open/close,
                                        2 lifetime (shared while open), 3 evictor,
                                        _FETCH_BASE + key bits: one per digest being fetched

Rules the code keeps:
- A name under cas/ only ever holds complete content that matched its digest: content is
  written to tmp/, verified, then renamed into place. Cached inodes are never written or
  chmod-ed again; the executable variant is a copy, never a mode change.
- The index lock guards both the table and the final names, so a file exists under cas/
  exactly when the index has its entry (a holder that dies mid-change leaves the busy
  flag, and the next holder rescans).
- The empty blob has no file: it is always present and link_into creates a fresh empty file.

Eviction contract: blobs are evicted (LRU, from the high watermark max_size_bytes down to
low_watermark * max_size_bytes, both less reserved_bytes: the server's partial uploads,
which share the budget; the most recently used blob is always spared, so one
larger than the whole cache outlives its own insert) while other processes may be staging
from them. link_into of an evicted blob raises BlobNotFound, and the caller fetches it
again (under fetch_lock) and retries. A link made before the eviction keeps its content,
since the inode outlives its cache name: a staged file is never partial. Reads keep their
open file likewise.

Restart: the first process to open the store after a dirty shutdown (the clean flag is
only set by the last process to close) or after a reboot (the clean close records the
kernel's boot id; content the page cache had not written back may be gone) rebuilds the
index from a directory scan. The scan drops temp files and files whose size disagrees
with their name, and marks every entry unverified: its digest is checked on its first
read, link or blob_path, and a corrupt blob is dropped and reported missing. After a
clean shutdown, opening does no scan.

Threads: every method may be called from many threads at once, except close(), which
must come after the last call.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from engine import hashing
from engine.cas import fdlock
from engine.cas.index import (
    FLAG_EXEC,
    FLAG_UNVERIFIED,
    FUNCTION_SHIFT,
    Entry,
    IndexVersionError,
    Record,
    SharedIndex,
    entry_key,
)
from engine.cas.store import BlobNotFound, DigestMismatch
from engine.cas.verify import check, check_range, too_long, verify_chunks
from engine.digest import ENUM_BY_FUNCTION, HASH_LENGTH, Digest, DigestError

log = logging.getLogger(__name__)

_OPEN_BYTE = 1
_LIFETIME_BYTE = 2
_EVICT_BYTE = 3
_FETCH_BASE = 1 << 32

_FUNCTION_NAMES = {v: k for k, v in ENUM_BY_FUNCTION.items()}
_MODE = {False: 0o444, True: 0o555}
_HEX = re.compile(r"[0-9a-f]+\Z")
_CHUNK = 1 << 20
_TOUCH_BATCH = 1024
_TOUCH_INTERVAL_S = 1.0
_EVICT_BATCH = 256
_LINK_ATTEMPTS = 4
# Renames per hold of the index lock in write_many: others wait at most a few ms.
_PUBLISH_BATCH = 128


def _initial_capacity(max_size_bytes: int) -> int:
    # Room for twice as many blobs as an average of 64 KiB would fill; the table grows.
    if not max_size_bytes:
        return 1 << 14
    return min(1 << 22, max(1 << 14, 2 * max_size_bytes // (64 << 10)))


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy_fd(src: int, dst: int) -> int:
    """Copy src to dst from their current offsets, in the kernel when it can; bytes copied."""
    total = 0
    try:
        while n := os.copy_file_range(src, dst, 1 << 30):
            total += n
        return total
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while data := os.read(src, _CHUNK):
        _write_all(dst, data)
        total += len(data)
    return total


def _make_private(fd: int) -> None:
    if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
        os.fchmod(fd, 0o600)


def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return b""


def _syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


class LocalDiskStore:
    """A BlobStore on local disk that many processes (and their threads) share at once."""

    def __init__(self, root: str, max_size_bytes: int = 0, low_watermark: float = 0.9):
        if not isinstance(max_size_bytes, int) or max_size_bytes < 0:
            raise ValueError(f"max_size_bytes must be a non-negative integer (0 = unlimited), "
                             f"got {max_size_bytes!r}")
        if not 0.0 < low_watermark <= 1.0:
            raise ValueError(f"low_watermark must be in (0, 1], got {low_watermark!r}")
        self.root = os.path.abspath(root)
        self.max_size_bytes = max_size_bytes
        self.low_watermark = low_watermark
        self.recovered = False
        self.rotations = 0
        # Bytes held outside the CAS in the same budget (the server's partial uploads):
        # eviction keeps the cache's total plus these under max_size_bytes.
        self.reserved_bytes = 0
        # Tests set this to pretend the filesystem refuses links past this count (EMLINK).
        self.link_limit = 0
        self._cas = os.path.join(self.root, "cas")
        self._tmp = os.path.join(self.root, "tmp")
        os.makedirs(self._cas, exist_ok=True)
        os.makedirs(self._tmp, exist_ok=True)
        self._tmp_names = itertools.count()
        # Creating files in one directory is serial in the kernel (the directory's lock);
        # threads that queue here sleep instead of spinning on that lock, which took a fifth
        # of the CPU of 8 fetch threads storing small blobs.
        self._create_lock = threading.Lock()
        self._touches: dict[tuple[Digest, bool], None] = {}
        self._touch_lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._fetch_mutex = threading.Lock()
        self._fetching: dict[int, list] = {}
        self._evict_tlock = threading.Lock()
        self._closed = False
        self._boot = _boot_id()
        # 0600: whoever can open the lock file can take a lock on it and stall every CAS
        # writer; the index likewise (the index module creates it 0644).
        self._lock_fd = os.open(os.path.join(self.root, "lock"),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _make_private(self._lock_fd)
            index_fd = os.open(os.path.join(self.root, "index"),
                               os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                _make_private(index_fd)
            finally:
                os.close(index_fd)
            self._index = self._open_index()
        except BaseException:
            os.close(self._lock_fd)
            raise
        # After a dirty restart: keys this process has seen verified, so the hot path
        # stops taking the index lock for them.
        self._known_good: set[int] = set()
        self._maybe_unverified = self._index.unverified > 0
        self._maybe_evict()

    def _open_index(self) -> SharedIndex:
        fd = self._lock_fd
        fdlock.lock(fd, _OPEN_BYTE)
        try:
            first = fdlock.lock(fd, _LIFETIME_BYTE, exclusive=True, wait=False)
            index = SharedIndex(os.path.join(self.root, "index"), fd, self._scan)
            if not first:
                fdlock.lock(fd, _LIFETIME_BYTE, exclusive=False)
                if not index.valid:
                    index.close()
                    raise IndexVersionError(
                        f"{self.root}/index has another format and is in use by another "
                        "process; stop it or use another local_cache root")
                return index
            # Nobody else has the store open: leftovers in tmp/ belong to dead processes.
            for name in os.listdir(self._tmp):
                self._unlink_quietly(os.path.join(self._tmp, name))
            # After a reboot, content the kernel had not yet written back may be lost
            # even though the last close was clean.
            if not index.valid or not index.clean or index.boot_id != self._boot:
                existed = index.has_magic
                if not index.valid:
                    index.initialize(_initial_capacity(self.max_size_bytes))
                index.clear_busy()
                started = time.monotonic()
                with index.locked(repair=False):
                    index.reset(self._scan(unverified=True))
                self.recovered = existed or index.entry_count > 0
                if self.recovered:
                    log.warning("local CAS %s was not shut down cleanly: rebuilt the index "
                                "of %d blobs in %.2fs; each is verified on first use",
                                self.root, index.entry_count, time.monotonic() - started)
            index.set_clean(False, self._boot, durable=not self._boot)
            fdlock.lock(fd, _LIFETIME_BYTE, exclusive=False)
            return index
        finally:
            fdlock.unlock(fd, _OPEN_BYTE)

    def close(self) -> None:
        """Release the store; the last process to close marks the index clean."""
        if self._closed:
            return
        self._closed = True
        fd = self._lock_fd
        try:
            self._flush_touches()
            fdlock.lock(fd, _OPEN_BYTE)
            try:
                if fdlock.lock(fd, _LIFETIME_BYTE, exclusive=True, wait=False):
                    with self._index.locked():
                        pass  # repairs a table torn by a process that died holding it
                    if not self._boot:
                        # Without a boot id a reboot goes unnoticed: make the content
                        # durable before the flag promises it.
                        _syncfs(self._cas)
                    self._index.set_clean(True, self._boot, durable=not self._boot)
                else:
                    # Not the last: give up our share while _OPEN_BYTE is still held, or a
                    # process closing right after us would find it and think itself not
                    # the last either, and nobody would mark the index clean.
                    fdlock.unlock(fd, _LIFETIME_BYTE)
            finally:
                fdlock.unlock(fd, _OPEN_BYTE)
        finally:
            self._index.close()
            os.close(fd)

    def __enter__(self) -> LocalDiskStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- names ---------------------------------------------------------------------------
    def _path(self, d: Digest, executable: bool) -> str:
        h = d.hash
        if HASH_LENGTH.get(d.function) != len(h) or not h.isalnum():
            raise DigestError(f"malformed digest {d}")
        if executable:
            return f"{self._cas}/{d.function}/{h[:2]}/{h}-{d.size}-x"
        return f"{self._cas}/{d.function}/{h[:2]}/{h}-{d.size}"

    def _entry_path(self, e: Entry) -> str | None:
        function = _FUNCTION_NAMES.get(e.function_id)
        if function is None:
            return None
        h = e.hash.hex()
        suffix = "-x" if e.executable else ""
        return f"{self._cas}/{function}/{h[:2]}/{h}-{e.size}{suffix}"

    @staticmethod
    def _key(d: Digest, executable: bool) -> int:
        return entry_key(d.function, d.hash, d.size, executable)

    @staticmethod
    def _validate(d: Digest) -> None:
        if d.function not in ENUM_BY_FUNCTION:
            raise DigestError(f"unsupported digest function {d.function!r}")
        if len(d.hash) != HASH_LENGTH[d.function] or not _HEX.match(d.hash):
            raise DigestError(f"malformed {d.function} hash {d.hash!r}")
        if d.size < 0:
            raise DigestError(f"negative size_bytes {d.size}")

    def _new_tmp(self, mode: int) -> tuple[int, str]:
        path = f"{self._tmp}/{os.getpid()}.{next(self._tmp_names)}"
        with self._create_lock:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # the umask must not strip read access from other users
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return fd, path

    @staticmethod
    def _unlink_quietly(path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass

    # -- presence and LRU ----------------------------------------------------------------
    def has(self, digest: Digest) -> bool:
        if digest.size == 0:
            return True
        for executable in (False, True):
            if os.access(self._path(digest, executable), os.F_OK):
                self._note_touch(digest, executable)
                return True
        return False

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        return [d for d in dict.fromkeys(digests) if not self.has(d)]

    def touch(self, digest: Digest) -> None:
        """Mark both variants of digest as just used (batched into the shared index)."""
        if digest.size:
            self._note_touch(digest, False)
            self._note_touch(digest, True)

    def _note_touch(self, d: Digest, executable: bool) -> None:
        # A dict keeps one pending touch per blob however often it is used in a batch.
        touches = self._touches
        touches[(d, executable)] = None
        if (len(touches) >= _TOUCH_BATCH
                or time.monotonic() - self._last_flush > _TOUCH_INTERVAL_S):
            self._flush_touches()

    def _flush_touches(self) -> None:
        with self._touch_lock:
            batch, self._touches = self._touches, {}
            self._last_flush = time.monotonic()
        if not batch:
            return
        # list() copies without running Python code, so a thread still adding to the old
        # dict cannot break the iteration (its touch is lost: LRU is approximate anyway).
        keys = [entry_key(d.function, d.hash, d.size, x) for d, x in list(batch)]
        with self._index.locked() as index:
            index.touch_many(keys)

    # -- verification after a dirty restart ----------------------------------------------
    def _verify_once(self, d: Digest, executable: bool) -> None:
        """Check an unverified blob's content; drop it if corrupt (it then reads as missing)."""
        index = self._index
        if not index.unverified:
            self._maybe_unverified = False
            return
        key = self._key(d, executable)
        if key in self._known_good:
            return
        with index.locked():
            slot = index.find(key)
            if slot < 0:
                return
            if not index.entry(slot).unverified:
                self._known_good.add(key)
                return
        path = self._path(d, executable)
        try:
            actual_hash, actual_size = hashing.hash_file(d.function, path)
        except FileNotFoundError:
            return
        good = actual_hash == d.hash and actual_size == d.size
        with index.locked():
            slot = index.find(key)
            if slot < 0:
                return
            if good:
                index.mark_verified(slot)
                self._known_good.add(key)
                return
            self._unlink_quietly(path)
            index.remove(slot)
        log.warning("local CAS: dropped corrupt blob %s (content hashes to %s, %d bytes)",
                    path, actual_hash, actual_size)

    # -- reading -------------------------------------------------------------------------
    def _open_blob(self, d: Digest) -> int:
        for executable in (False, True):
            if self._maybe_unverified:
                self._verify_once(d, executable)
            try:
                fd = os.open(self._path(d, executable), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            self._note_touch(d, executable)
            return fd
        raise BlobNotFound(d)

    def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> Iterator[bytes]:
        check_range(digest, offset, limit)
        if digest.size == 0:
            return iter(())
        fd = self._open_blob(digest)
        end = digest.size if limit == 0 else min(digest.size, offset + limit)
        return self._read_fd(fd, digest, offset, end)

    @staticmethod
    def _read_fd(fd: int, d: Digest, pos: int, end: int) -> Iterator[bytes]:
        try:
            while pos < end:
                data = os.pread(fd, min(_CHUNK, end - pos), pos)
                if not data:
                    raise OSError(errno.EIO, f"cached blob {d} is shorter than its size")
                pos += len(data)
                yield data
        finally:
            os.close(fd)

    def read_bytes(self, digest: Digest) -> bytes:
        if digest.size == 0:
            return b""
        fd = self._open_blob(digest)
        with open(fd, "rb", buffering=0) as f:
            data = f.read()
        if len(data) != digest.size:
            raise OSError(errno.EIO, f"cached blob {digest} has {len(data)} bytes")
        return data

    def blob_path(self, digest: Digest) -> str:
        """The path of the blob's read-only non-executable inode (for mmap or zero-copy
        reads). It may be evicted afterwards: open it promptly, and treat ENOENT as
        BlobNotFound."""
        if digest.size == 0:
            raise ValueError("the empty blob has no file in the local CAS; "
                             "handle size 0 without reading")
        if self._maybe_unverified:
            self._verify_once(digest, False)
        path = self._path(digest, False)
        if not os.access(path, os.F_OK) and not self._make_variant(digest, False):
            raise BlobNotFound(digest)
        self._note_touch(digest, False)
        return path

    @contextmanager
    def fetch_lock(self, digest: Digest) -> Iterator[None]:
        """Machine-wide single flight for one digest: hold it while fetching the blob.

        Callers re-check has() once inside: another process may have fetched it meanwhile.
        """
        key = self._key(digest, False)
        # Threads of this process queue on a per-digest lock (they share one lock fd, and
        # a lock never conflicts with its own fd); processes on a byte of the lock file.
        with self._fetch_mutex:
            waiters = self._fetching.get(key)
            if waiters is None:
                waiters = self._fetching[key] = [threading.Lock(), 0]
            waiters[1] += 1
        offset = _FETCH_BASE + (key >> 24)
        try:
            with waiters[0]:
                fdlock.lock(self._lock_fd, offset)
                try:
                    yield
                finally:
                    fdlock.unlock(self._lock_fd, offset)
        finally:
            with self._fetch_mutex:
                waiters[1] -= 1
                if not waiters[1]:
                    del self._fetching[key]

    # -- staging -------------------------------------------------------------------------
    def bulk_link_source(self, digest: Digest, executable: bool) -> str | None:
        """The cached inode's path, for linking many files in one native call
        (engine.native.link_tree), or None when each link must go through link_into: the
        empty blob, a store not yet verified after a crash, or the test link limit. A
        source that fails with ENOENT or EMLINK is retried through link_into."""
        if digest.size == 0 or self._maybe_unverified or self.link_limit:
            return None
        return self._path(digest, executable)

    def note_linked(self, digest: Digest, executable: bool) -> None:
        """Record a bulk link as a use of the blob, for LRU order."""
        self._note_touch(digest, executable)

    def link_into(self, digest: Digest, executable: bool, dest_path: str) -> None:
        """Hardlink the cached read-only inode of digest (and exec bit) at dest_path.

        Raises BlobNotFound if the blob is absent (it may have just been evicted: fetch it
        again and retry) and FileExistsError if dest_path exists. dest_path must be on the
        cache's filesystem (else EXDEV).
        """
        if digest.size == 0:
            self._create_empty(dest_path, executable)
            return
        src = self._path(digest, executable)
        if self._maybe_unverified:
            self._verify_once(digest, executable)
        for _ in range(_LINK_ATTEMPTS):
            try:
                if self.link_limit and os.stat(src).st_nlink >= self.link_limit:
                    raise OSError(errno.EMLINK, os.strerror(errno.EMLINK), src)
                os.link(src, dest_path)
            except FileNotFoundError:
                if not os.path.isdir(os.path.dirname(dest_path) or "."):
                    raise  # the caller's mistake, not a missing blob
                if os.access(src, os.F_OK):
                    continue  # evicted and published again meanwhile
                if not self._make_variant(digest, executable):
                    raise BlobNotFound(digest) from None
                continue
            except OSError as e:
                if e.errno != errno.EMLINK:
                    raise
                self._rotate(digest, executable)
                continue
            self._note_touch(digest, executable)
            return
        raise OSError(errno.EMLINK, f"cannot link {digest}: its cache inode stays at the "
                      "link limit after rotating", dest_path)

    @staticmethod
    def _create_empty(dest_path: str, executable: bool) -> None:
        mode = _MODE[executable]
        fd = os.open(dest_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def _make_variant(self, d: Digest, executable: bool) -> bool:
        """Publish the (non-)executable inode as a copy of the other one; False if absent."""
        if self._maybe_unverified:
            self._verify_once(d, not executable)
        try:
            src = os.open(self._path(d, not executable), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            tmp = self._copy_to_tmp(src, d, executable, verify=False)
        finally:
            os.close(src)
        self._publish(tmp, d, executable)
        return True

    def _rotate(self, d: Digest, executable: bool) -> None:
        """Replace a cache inode that reached the link limit with a fresh copy.

        Links already made keep the old inode; the index entry (same size) stays.
        """
        path = self._path(d, executable)
        try:
            src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobNotFound(d) from None
        try:
            tmp = self._copy_to_tmp(src, d, executable, verify=False)
        finally:
            os.close(src)
        with self._index.locked() as index:
            if index.find(self._key(d, executable)) >= 0 and os.access(path, os.F_OK):
                os.rename(tmp, path)
                tmp = ""
                self.rotations += 1
        if tmp:
            self._unlink_quietly(tmp)
            raise BlobNotFound(d)

    # -- writing -------------------------------------------------------------------------
    def write(self, digest: Digest, chunks: Iterable[bytes]) -> None:
        if digest.size == 0:
            verify_chunks(digest, chunks)
            return
        self._validate(digest)
        if self._present(digest, False):
            verify_chunks(digest, chunks)  # nothing to store, but the caller's data must match
            return
        fd, tmp = self._new_tmp(_MODE[False])
        try:
            hasher = hashing.new_hasher(digest.function)
            size = 0
            try:
                for chunk in chunks:
                    size += len(chunk)
                    if size > digest.size:
                        raise too_long(digest, size)
                    hasher.update(chunk)
                    _write_all(fd, chunk)
            finally:
                os.close(fd)
            check(digest, hasher.hexdigest(), size)
            self._publish(tmp, digest, False)
        except BaseException:
            self._unlink_quietly(tmp)
            raise

    def write_bytes(self, digest: Digest, data: bytes) -> None:
        self.write(digest, (data,))

    def write_many(self, blobs: list[tuple[Digest, bytes]]) -> list[Exception | None]:
        """Store many small blobs at once; per blob, None or the error that refused it
        (DigestError, DigestMismatch, OSError), in order.

        Cheaper than write_bytes in a loop: the blobs are hashed in one pass and published
        under one hold of the index lock per _PUBLISH_BATCH. Each is still written to
        tmp/ and verified before its rename, so a name never shows partial content.
        """
        errors: list[Exception | None] = [None] * len(blobs)
        staged: list[tuple[str, Digest]] = []
        try:
            for i, (d, data) in enumerate(blobs):
                try:
                    self._validate(d)
                    if len(data) != d.size:
                        raise DigestMismatch(d, "(not computed: size differs)", len(data))
                    check(d, hashing.hash_bytes(d.function, data), len(data))
                    if not d.size or self._present(d, False):
                        continue
                    fd, tmp = self._new_tmp(_MODE[False])
                    try:
                        _write_all(fd, data)
                    except BaseException:
                        os.close(fd)
                        self._unlink_quietly(tmp)
                        raise
                    os.close(fd)
                    staged.append((tmp, d))
                except (DigestError, DigestMismatch, OSError) as e:
                    errors[i] = e
            added = False
            while staged:
                group, staged = staged[:_PUBLISH_BATCH], staged[_PUBLISH_BATCH:]
                leftovers = []
                with self._index.locked() as index:
                    for n, (tmp, d) in enumerate(group):
                        try:
                            was_added, renamed = self._publish_locked(index, tmp, d, False)
                        except BaseException:
                            staged = group[n:] + staged  # unlinked below
                            raise
                        added |= was_added
                        if not renamed:
                            leftovers.append(tmp)
                for tmp in leftovers:
                    self._unlink_quietly(tmp)
        finally:
            for tmp, _ in staged:
                self._unlink_quietly(tmp)
        if added:
            self._maybe_evict()
        return errors

    def insert_file(self, digest: Digest, src_path: str, *, move: bool = False,
                    verify: bool = True, executable: bool = False) -> None:
        """Publish the content of the file at src_path (e.g. an action output) under digest.

        move=True may rename the file itself into the cache when it is a plain file with one
        link on the same filesystem (it becomes read-only and must not be written again);
        otherwise, or if the blob is already cached, the file is copied or left in place.
        verify=False trusts the caller's digest (only the size is checked).
        """
        self._validate(digest)
        if move:
            st = os.lstat(src_path)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and digest.size:
                self._check_file(digest, src_path, st.st_size, verify)
                if self._present(digest, executable):
                    return
                os.chmod(src_path, _MODE[executable])
                try:
                    self._publish(src_path, digest, executable, consume=False)
                    return
                except OSError as e:
                    if e.errno != errno.EXDEV:
                        raise
                os.chmod(src_path, stat.S_IMODE(st.st_mode))
                verify = False  # checked above; now copy across filesystems
        # Never a symlink, never a FIFO that would block the open (src may be an action's).
        src = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", src_path)
            size = st.st_size
            if size != digest.size or not digest.size or self._present(digest, executable):
                self._check_file(digest, src_path, size, verify)
                return
            tmp = self._copy_to_tmp(src, digest, executable, verify)
        finally:
            os.close(src)
        self._publish(tmp, digest, executable)

    @staticmethod
    def _check_file(d: Digest, path: str, size: int, verify: bool) -> None:
        if size != d.size:
            raise DigestMismatch(d, "(not computed: size differs)", size)
        if verify:
            check(d, *hashing.hash_file(d.function, path))

    def _present(self, d: Digest, executable: bool) -> bool:
        """Whether writing d can be skipped; never while unverified copies may exist, so
        that fresh verified content replaces them."""
        if not self._maybe_unverified and os.access(self._path(d, executable), os.F_OK):
            self._note_touch(d, executable)
            return True
        return False

    def _copy_to_tmp(self, src: int, d: Digest, executable: bool, verify: bool) -> str:
        """Copy an open file into a new temp file (hashing on the way if verify)."""
        fd, tmp = self._new_tmp(_MODE[executable])
        try:
            try:
                if verify:
                    hasher = hashing.new_hasher(d.function)
                    buf = bytearray(_CHUNK)
                    view = memoryview(buf)
                    size = 0
                    while n := os.readv(src, [buf]):
                        size += n
                        if size > d.size:
                            raise too_long(d, size)
                        hasher.update(view[:n])
                        _write_all(fd, view[:n])
                    check(d, hasher.hexdigest(), size)
                else:
                    size = _copy_fd(src, fd)
                    if size != d.size:
                        raise DigestMismatch(d, "(not computed: size differs)", size)
            finally:
                os.close(fd)
        except BaseException:
            self._unlink_quietly(tmp)
            raise
        return tmp

    def _publish(self, src: str, d: Digest, executable: bool, consume: bool = True) -> None:
        """Rename verified content at src into its cache name and account for it.

        "Already present" is success; src is then unlinked if consume, else left alone.
        """
        with self._index.locked() as index:
            added, renamed = self._publish_locked(index, src, d, executable)
        if consume and not renamed:
            self._unlink_quietly(src)
        if added:
            self._maybe_evict()

    def _publish_locked(self, index: SharedIndex, src: str, d: Digest,
                        executable: bool) -> tuple[bool, bool]:
        """_publish's work under the index lock: (index entry added, src renamed)."""
        key = self._key(d, executable)
        final = self._path(d, executable)
        slot = index.find(key)
        if slot >= 0 and not index.entry(slot).unverified and os.access(final, os.F_OK):
            index.touch(key)
            return False, False
        if slot < 0:
            index.reserve()
        try:
            os.rename(src, final)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(src, final)
        if slot >= 0:
            # Our verified copy replaced an unverified or vanished one.
            index.mark_verified(slot)
            index.touch(key)
            return False, True
        flags = ENUM_BY_FUNCTION[d.function] << FUNCTION_SHIFT
        if executable:
            flags |= FLAG_EXEC
        index.insert(key, d.size, flags, bytes.fromhex(d.hash))
        return True, True

    # -- eviction ------------------------------------------------------------------------
    def over_budget(self) -> bool:
        """Whether cached blobs plus reserved_bytes pass max_size_bytes."""
        return bool(self.max_size_bytes) and \
            self._index.total_bytes + self.reserved_bytes > self.max_size_bytes

    def _maybe_evict(self) -> None:
        if self.over_budget():
            self.evict()

    def evict(self) -> int:
        """Evict least recently used blobs down to the low watermark; how many went.

        One process evicts at a time; others skip it and keep writing. The evictor checks
        again after letting go, for what they added while it held the lock.
        """
        evicted = 0
        while self.over_budget():
            if not self._evict_tlock.acquire(blocking=False):
                break
            try:
                if not fdlock.lock(self._lock_fd, _EVICT_BYTE, wait=False):
                    break
                try:
                    low = int(self.max_size_bytes * self.low_watermark)
                    n = self._evict_to(max(0, low - self.reserved_bytes))
                finally:
                    fdlock.unlock(self._lock_fd, _EVICT_BYTE)
            finally:
                self._evict_tlock.release()
            if not n:
                break
            evicted += n
        return evicted

    def _evict_to(self, target: int) -> int:
        self._flush_touches()
        index = self._index
        evicted = 0
        while index.total_bytes > target:
            # Pick victims from a snapshot without the lock; re-check each under it, keeping
            # any blob used since the snapshot.
            rows = sorted(index.snapshot(), key=lambda row: row[2])
            # Spare the most recent blob, or one larger than the whole cache would be
            # evicted by its own insert and its user would fetch it forever.
            rows = rows[:-1]
            need = index.total_bytes - target
            victims = []
            for row in rows:
                victims.append(row)
                need -= row[1]
                if need <= 0:
                    break
            progress = 0
            for start in range(0, len(victims), _EVICT_BATCH):
                trash = []
                with index.locked():
                    gone = 0
                    for key, _size, stamp, _flags in victims[start:start + _EVICT_BATCH]:
                        if index.total_bytes <= target:
                            break
                        slot = index.find(key)
                        if slot < 0:
                            continue
                        e = index.entry(slot)
                        if e.stamp != stamp:
                            continue
                        path = self._entry_path(e)
                        if path is not None:
                            # Renaming is cheaper than unlinking (which frees data blocks)
                            # while others wait for the lock.
                            t = f"{self._tmp}/{os.getpid()}.{next(self._tmp_names)}.evicted"
                            try:
                                os.rename(path, t)
                                trash.append(t)
                            except FileNotFoundError:
                                pass
                        index.remove(slot)
                        gone += 1
                    index.add_evictions(gone)
                progress += gone
                for t in trash:
                    self._unlink_quietly(t)
                if index.total_bytes <= target:
                    break
            if not progress:
                break
            evicted += progress
        return evicted

    # -- recovery ------------------------------------------------------------------------
    def _scan(self, unverified: bool = False) -> list[Record]:
        """Index records for every well-formed blob file; deletes the malformed ones."""
        records: list[Record] = []
        base = FLAG_UNVERIFIED if unverified else 0
        for function, fid in ENUM_BY_FUNCTION.items():
            try:
                shards = list(os.scandir(os.path.join(self._cas, function)))
            except FileNotFoundError:
                continue
            flags = base | (fid << FUNCTION_SHIFT)
            hash_len = HASH_LENGTH[function]
            for shard in shards:
                if not shard.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(shard.path) as entries:
                    for e in entries:
                        record = self._parse(e, function, hash_len, shard.name, flags)
                        if record is None:
                            self._unlink_quietly(e.path)
                        else:
                            records.append(record)
        return records

    @staticmethod
    def _parse(e: os.DirEntry, function: str, hash_len: int, shard: str,
               flags: int) -> Record | None:
        parts = e.name.split("-")
        executable = len(parts) == 3 and parts[2] == "x"
        if not (len(parts) == 2 or executable):
            return None
        h, size_text = parts[0], parts[1]
        if (len(h) != hash_len or not _HEX.match(h) or h[:2] != shard
                or not size_text.isdigit() or str(int(size_text)) != size_text):
            return None
        size = int(size_text)
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            return None
        if size == 0 or not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return None
        if executable:
            flags |= FLAG_EXEC
        return Record(entry_key(function, h, size, executable), size, flags,
                      bytes.fromhex(h), st.st_mtime_ns)

    # -- figures -------------------------------------------------------------------------
    def stats(self) -> dict:
        self._flush_touches()
        index = self._index
        with index.locked():
            return {
                "total_bytes": index.total_bytes,
                "entries": index.entry_count,
                "evictions": index.evictions,
                "max_size_bytes": self.max_size_bytes,
                "unverified": index.unverified,
                "rotations": self.rotations,
                "index_capacity": index.capacity,
                "index_repairs": index.repairs,
            }
