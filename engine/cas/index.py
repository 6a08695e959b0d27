"""The shared index of the local CAS: size accounting and LRU order for every process.

One file, mapped MAP_SHARED by every store instance on the machine, so all of them see the
same totals and access order without a daemon.

  header (one page): magic, version, entry size, capacity, total bytes, entry count,
      generation, logical clock, evictions, unverified count, clean flag, busy flag,
      boot id of the clean close
  table: `capacity` 64-byte slots, open addressing with linear probing; a key of 0 marks
      an empty slot. Slot: key u64, size u64, stamp u64, flags u32, reserved u32, and the
      raw 32-byte hash, so eviction can name the file the entry stands for.

Every change happens under an exclusive lock on byte INDEX_LOCK_BYTE of the store's lock
file. The busy flag is set for as long as that lock is held: a holder killed mid-update
leaves it set, and the next holder rebuilds the table from the directory (through the
store's scan callback) instead of trusting a torn table.

Stamps come from a machine-wide logical clock in the header rather than wall time, so LRU
order is exact across processes and immune to clock jumps.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import xxhash

from engine.cas import fdlock

MAGIC = b"STKRCAS\x00"
VERSION = 1
HEADER_SIZE = 4096
ENTRY = struct.Struct("<QQQII32s")
ENTRY_SIZE = ENTRY.size
MIN_CAPACITY = 1 << 12
MAX_CAPACITY = 1 << 28
INDEX_LOCK_BYTE = 0

FLAG_EXEC = 0x1
FLAG_UNVERIFIED = 0x2
FUNCTION_SHIFT = 8

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SNAPSHOT_ROW = struct.Struct("<QQQI36x")
_ZERO_ENTRY = bytes(ENTRY_SIZE)
_SEED_MASK = (1 << 64) - 1
_ZERO_CHUNK = bytes(1 << 20)

# Header field offsets.
_H_MAGIC = 0
_H_VERSION = 8
_H_ENTRY_SIZE = 12
_H_CAPACITY = 16
_H_TOTAL = 24
_H_COUNT = 32
_H_GENERATION = 40
_H_CLOCK = 48
_H_EVICTIONS = 56
_H_UNVERIFIED = 64
_H_CLEAN = 72
_H_BUSY = 76
_H_BOOT_ID = 80

# Entry field offsets.
_E_STAMP = 16
_E_FLAGS = 24


def entry_key(function: str, hash_: str, size: int, executable: bool) -> int:
    """The table key of one cached inode; never 0, which marks an empty slot."""
    # The seed carries size and exec bit: cheaper than formatting them into the input.
    seed = (((size << 1) | executable) * 0x9E3779B97F4A7C15) & _SEED_MASK
    key = xxhash.xxh64_intdigest(function.encode() + hash_.encode(), seed)
    return key or 1


@dataclass(frozen=True, slots=True)
class Entry:
    key: int
    size: int
    stamp: int
    flags: int
    hash: bytes

    @property
    def executable(self) -> bool:
        return bool(self.flags & FLAG_EXEC)

    @property
    def unverified(self) -> bool:
        return bool(self.flags & FLAG_UNVERIFIED)

    @property
    def function_id(self) -> int:
        return (self.flags >> FUNCTION_SHIFT) & 0xFF


class Record(NamedTuple):
    """One entry for reset(); `order` sorts records from least to most recently used."""

    key: int
    size: int
    flags: int
    hash: bytes
    order: Any


class IndexFull(OSError):
    """The index cannot take another entry (it could not grow)."""


class IndexVersionError(RuntimeError):
    """The index file belongs to another format version that a live process still uses."""


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _resize(fd: int, size: int, old_size: int) -> None:
    """Grow the index file with its blocks allocated: a sparse file on a full disk would
    turn the first write to a new page of the mapping into SIGBUS, killing the process; this
    way a full disk is an OSError (ENOSPC) here, and the file keeps its old size."""
    os.ftruncate(fd, size)
    try:
        _allocate(fd, size)
    except OSError:
        os.ftruncate(fd, old_size)
        raise


def _allocate(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        # A filesystem without fallocate: the file stays sparse.
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


class SharedIndex:
    """The mmap'd table. Methods other than locked(), snapshot() and the lock-free header
    hints must be called inside `with index.locked():`."""

    def __init__(self, path: str, lock_fd: int, scan: Callable[[], list[Record]]):
        self._lock_fd = lock_fd
        self._scan = scan
        self._tlock = threading.Lock()
        self._retired: list[mmap.mmap] = []
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        size = os.fstat(self._fd).st_size
        if size < HEADER_SIZE:
            _resize(self._fd, HEADER_SIZE, size)
        else:
            _allocate(self._fd, size)  # one an older version left sparse
        self._mm = mmap.mmap(self._fd, HEADER_SIZE)
        self._cap = 0
        self._mask = 0
        self.repairs = 0
        if self.valid:
            self._remap(self._get64(_H_CAPACITY))

    # -- header ----------------------------------------------------------------------
    def _get64(self, off: int) -> int:
        return _U64.unpack_from(self._mm, off)[0]

    def _set64(self, off: int, value: int) -> None:
        _U64.pack_into(self._mm, off, value)

    def _get32(self, off: int) -> int:
        return _U32.unpack_from(self._mm, off)[0]

    def _set32(self, off: int, value: int) -> None:
        _U32.pack_into(self._mm, off, value)

    @property
    def valid(self) -> bool:
        """Whether the file holds a table of our format (else initialize() it)."""
        mm = self._mm
        if mm[_H_MAGIC:_H_MAGIC + 8] != MAGIC:
            return False
        cap = self._get64(_H_CAPACITY)
        return (
            self._get32(_H_VERSION) == VERSION
            and self._get32(_H_ENTRY_SIZE) == ENTRY_SIZE
            and MIN_CAPACITY <= cap <= MAX_CAPACITY
            and cap & (cap - 1) == 0
            and os.fstat(self._fd).st_size >= HEADER_SIZE + cap * ENTRY_SIZE
        )

    @property
    def has_magic(self) -> bool:
        return self._mm[_H_MAGIC:_H_MAGIC + 8] == MAGIC

    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def total_bytes(self) -> int:
        return self._get64(_H_TOTAL)

    @property
    def entry_count(self) -> int:
        return self._get64(_H_COUNT)

    @property
    def evictions(self) -> int:
        return self._get64(_H_EVICTIONS)

    def add_evictions(self, n: int) -> None:
        self._set64(_H_EVICTIONS, self._get64(_H_EVICTIONS) + n)

    @property
    def unverified(self) -> int:
        return self._get64(_H_UNVERIFIED)

    @property
    def generation(self) -> int:
        return self._get64(_H_GENERATION)

    @property
    def clean(self) -> bool:
        return bool(self._get32(_H_CLEAN))

    @property
    def boot_id(self) -> bytes:
        return self._mm[_H_BOOT_ID:_H_BOOT_ID + 16]

    def set_clean(self, clean: bool, boot_id: bytes = b"", durable: bool = False) -> None:
        """Set the clean-shutdown flag and the boot it holds for; durable writes it through.

        A stale copy on disk only matters across a reboot, which a recorded boot id
        already catches; without one, pass durable=True.
        """
        self._mm[_H_BOOT_ID:_H_BOOT_ID + 16] = boot_id.ljust(16, b"\0")[:16]
        self._set32(_H_CLEAN, 1 if clean else 0)
        if durable:
            self._mm.flush(0, HEADER_SIZE)

    # -- mapping ---------------------------------------------------------------------
    def initialize(self, capacity: int) -> None:
        """Start an empty table (the caller has the index to itself)."""
        cap = min(MAX_CAPACITY, max(MIN_CAPACITY, _pow2_at_least(capacity)))
        self._retire()
        self._mm = None  # type: ignore[assignment]
        # Truncating first zeroes whatever an older format left behind.
        os.ftruncate(self._fd, HEADER_SIZE)
        _resize(self._fd, HEADER_SIZE + cap * ENTRY_SIZE, HEADER_SIZE)
        self._mm = mmap.mmap(self._fd, HEADER_SIZE)
        self._mm[_H_MAGIC:_H_MAGIC + 8] = MAGIC
        self._set32(_H_VERSION, VERSION)
        self._set32(_H_ENTRY_SIZE, ENTRY_SIZE)
        self._set64(_H_CAPACITY, cap)
        self._remap(cap)

    def _retire(self) -> None:
        # Another thread may still be reading through the old map (lock-free hints), so
        # maps are closed only in close(); capacity grows by doubling, so they are few.
        if self._mm is not None:
            self._retired.append(self._mm)

    def _remap(self, cap: int) -> None:
        new = mmap.mmap(self._fd, HEADER_SIZE + cap * ENTRY_SIZE)
        self._retire()
        self._mm = new
        self._cap = cap
        self._mask = cap - 1

    def _sync_mapping(self) -> None:
        cap = self._get64(_H_CAPACITY)
        if cap != self._cap:
            self._remap(cap)

    # -- locking ---------------------------------------------------------------------
    @contextmanager
    def locked(self, repair: bool = True) -> Iterator[SharedIndex]:
        """Hold the index exclusively (threads and processes); repairs a torn table."""
        with self._tlock:
            fdlock.lock(self._lock_fd, INDEX_LOCK_BYTE)
            try:
                self._sync_mapping()
                torn = self._get32(_H_BUSY)
                self._set32(_H_BUSY, 1)
                if torn and repair:
                    self._repair()  # if this fails, the flag stays for the next holder
                try:
                    yield self
                except Exception:
                    # Table methods do not fail halfway; an interrupt (not an Exception)
                    # might, and then leaves the flag set.
                    self._set32(_H_BUSY, 0)
                    raise
                self._set32(_H_BUSY, 0)
            finally:
                fdlock.unlock(self._lock_fd, INDEX_LOCK_BYTE)

    def clear_busy(self) -> None:
        """Forget a torn marker (the caller is about to reset() anyway)."""
        self._set32(_H_BUSY, 0)

    def _repair(self) -> None:
        # Keep what the torn table still knows: access order and unverified marks.
        known: dict[int, tuple[int, int]] = {}
        for key, _size, stamp, flags in self._rows():
            known[key] = (stamp, flags)
        records = []
        for r in self._scan():
            old = known.get(r.key)
            if old is None:
                records.append(r._replace(order=(1, r.order)))
            else:
                flags = r.flags | (old[1] & FLAG_UNVERIFIED)
                records.append(r._replace(flags=flags, order=(0, old[0])))
        self.reset(records)
        self.repairs += 1

    # -- table -----------------------------------------------------------------------
    def _rows(self) -> list[tuple[int, int, int, int]]:
        data = self._mm[HEADER_SIZE:HEADER_SIZE + self._cap * ENTRY_SIZE]
        return [row for row in _SNAPSHOT_ROW.iter_unpack(data) if row[0]]

    def snapshot(self) -> list[tuple[int, int, int, int]]:
        """(key, size, stamp, flags) of every entry, without the cross-process lock.

        Rows can be stale or torn by a concurrent writer; callers re-check under locked().
        """
        with self._tlock:
            self._sync_mapping()
            return self._rows()

    def find(self, key: int) -> int:
        """The slot holding key, or -1."""
        mm = self._mm
        mask = self._mask
        unpack = _U64.unpack_from
        i = key & mask
        while True:
            k = unpack(mm, HEADER_SIZE + i * ENTRY_SIZE)[0]
            if k == key:
                return i
            if k == 0:
                return -1
            i = (i + 1) & mask

    def entry(self, slot: int) -> Entry:
        key, size, stamp, flags, _reserved, hash_ = ENTRY.unpack_from(
            self._mm, HEADER_SIZE + slot * ENTRY_SIZE)
        return Entry(key, size, stamp, flags, hash_)

    def _tick(self) -> int:
        stamp = self._get64(_H_CLOCK) + 1
        self._set64(_H_CLOCK, stamp)
        return stamp

    def _place(self, key: int, size: int, stamp: int, flags: int, hash_: bytes) -> bool:
        mm = self._mm
        mask = self._mask
        i = key & mask
        while True:
            off = HEADER_SIZE + i * ENTRY_SIZE
            k = _U64.unpack_from(mm, off)[0]
            if k == key:
                return False
            if k == 0:
                ENTRY.pack_into(mm, off, key, size, stamp, flags, 0, hash_)
                return True
            i = (i + 1) & mask

    def reserve(self) -> None:
        """Make room for one more entry: grow past 70% load; refuse past 95%."""
        count = self.entry_count + 1
        if count * 10 <= self._cap * 7:
            return
        if self._cap < MAX_CAPACITY:
            try:
                self._grow(self._cap * 2)
                return
            except OSError:
                pass
        if count * 20 > self._cap * 19:
            raise IndexFull(f"local CAS index is full ({self.entry_count} entries) and "
                              "cannot grow; lower local_cache max size or free disk space")

    def _grow(self, cap: int) -> None:
        live = [ENTRY.unpack_from(self._mm, HEADER_SIZE + i * ENTRY_SIZE)
                for i in range(self._cap)
                if _U64.unpack_from(self._mm, HEADER_SIZE + i * ENTRY_SIZE)[0]]
        _resize(self._fd, HEADER_SIZE + cap * ENTRY_SIZE, HEADER_SIZE + self._cap * ENTRY_SIZE)
        old_cap = self._cap
        self._remap(cap)
        self._zero_table(old_cap)
        for key, size, stamp, flags, _r, hash_ in live:
            self._place(key, size, stamp, flags, hash_)
        self._set64(_H_CAPACITY, cap)
        self._set64(_H_GENERATION, self.generation + 1)

    def _zero_table(self, slots: int) -> None:
        end = HEADER_SIZE + slots * ENTRY_SIZE
        off = HEADER_SIZE
        while off < end:
            n = min(len(_ZERO_CHUNK), end - off)
            self._mm[off:off + n] = _ZERO_CHUNK[:n]
            off += n

    def insert(self, key: int, size: int, flags: int, hash_: bytes) -> bool:
        """Add an entry as the most recently used; False (and a touch) if present."""
        slot = self.find(key)
        if slot >= 0:
            _U64.pack_into(self._mm, HEADER_SIZE + slot * ENTRY_SIZE + _E_STAMP, self._tick())
            return False
        self.reserve()
        self._place(key, size, self._tick(), flags, hash_)
        self._set64(_H_COUNT, self.entry_count + 1)
        self._set64(_H_TOTAL, self.total_bytes + size)
        if flags & FLAG_UNVERIFIED:
            self._set64(_H_UNVERIFIED, self.unverified + 1)
        return True

    def touch(self, key: int) -> bool:
        slot = self.find(key)
        if slot < 0:
            return False
        _U64.pack_into(self._mm, HEADER_SIZE + slot * ENTRY_SIZE + _E_STAMP, self._tick())
        return True

    def touch_many(self, keys: list[int]) -> None:
        """Mark keys as used, in order (absent keys are skipped)."""
        mm = self._mm
        find = self.find
        pack = _U64.pack_into
        clock = self._get64(_H_CLOCK)
        for key in keys:
            slot = find(key)
            if slot >= 0:
                clock += 1
                pack(mm, HEADER_SIZE + slot * ENTRY_SIZE + _E_STAMP, clock)
        self._set64(_H_CLOCK, clock)

    def mark_verified(self, slot: int) -> None:
        off = HEADER_SIZE + slot * ENTRY_SIZE + _E_FLAGS
        flags = _U32.unpack_from(self._mm, off)[0]
        if flags & FLAG_UNVERIFIED:
            _U32.pack_into(self._mm, off, flags & ~FLAG_UNVERIFIED)
            self._set64(_H_UNVERIFIED, self.unverified - 1)

    def remove(self, slot: int) -> Entry:
        """Drop the entry in slot (backward-shift deletion: no tombstones) and return it."""
        e = self.entry(slot)
        mm = self._mm
        mask = self._mask
        i = slot
        j = slot
        while True:
            j = (j + 1) & mask
            off_j = HEADER_SIZE + j * ENTRY_SIZE
            kj = _U64.unpack_from(mm, off_j)[0]
            if kj == 0:
                break
            home = kj & mask
            # Entry j stays unless its home lies outside the cyclic range (i, j].
            stays = (i < home <= j) if i <= j else (home > i or home <= j)
            if stays:
                continue
            off_i = HEADER_SIZE + i * ENTRY_SIZE
            mm[off_i:off_i + ENTRY_SIZE] = mm[off_j:off_j + ENTRY_SIZE]
            i = j
        off_i = HEADER_SIZE + i * ENTRY_SIZE
        mm[off_i:off_i + ENTRY_SIZE] = _ZERO_ENTRY
        self._set64(_H_COUNT, self.entry_count - 1)
        self._set64(_H_TOTAL, self.total_bytes - e.size)
        if e.unverified:
            self._set64(_H_UNVERIFIED, self.unverified - 1)
        return e

    def reset(self, records: list[Record]) -> None:
        """Replace the whole table; records are ranked by `order` (oldest first)."""
        cap = max(self._cap, MIN_CAPACITY, _pow2_at_least(2 * len(records)))
        cap = min(cap, MAX_CAPACITY)
        if cap != self._cap:
            _resize(self._fd, HEADER_SIZE + cap * ENTRY_SIZE, HEADER_SIZE + self._cap * ENTRY_SIZE)
            self._remap(cap)
            self._set64(_H_CAPACITY, cap)
        self._zero_table(cap)
        records = sorted(records, key=lambda r: r.order)
        stamp = total = count = unverified = 0
        for r in records:
            stamp += 1
            if count * 20 > cap * 19 or not self._place(r.key, r.size, stamp, r.flags, r.hash):
                continue
            count += 1
            total += r.size
            if r.flags & FLAG_UNVERIFIED:
                unverified += 1
        self._set64(_H_TOTAL, total)
        self._set64(_H_COUNT, count)
        self._set64(_H_CLOCK, stamp)
        self._set64(_H_UNVERIFIED, unverified)
        self._set64(_H_GENERATION, self.generation + 1)

    def close(self) -> None:
        for m in [*self._retired, self._mm]:
            if m is not None:
                m.close()
        self._retired = []
        os.close(self._fd)
