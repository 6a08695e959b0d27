"""Digest computation for the whole engine, through the native core (engine/native.py) or
its pure-Python fallback, whichever is loaded: IMPLEMENTATION says which."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import blake3

from engine import native

IMPLEMENTATION = native.IMPLEMENTATION

# digest_many spends most of its time in open/fstat/read/close and SHA-256 with the GIL
# released for its whole batch, so threads over slices of a batch scale with the cores; each
# slice holds the GIL only to convert its paths and to build its results. A large batch is
# cut into a few slices per thread, taken in turn by whichever thread is free: a thread
# slowed by other work on the machine then takes fewer slices instead of holding up the
# rest, and the last results built while no other thread runs are only one slice's.
_PARALLEL_FILES = 2048
_SLICES_PER_THREAD = 4
_THREADS = max(1, min(4, len(os.sched_getaffinity(0))))
_pool: ThreadPoolExecutor | None = None


def new_hasher(function: str):
    """A hashlib-style object with update() and hexdigest(), for incremental hashing."""
    import hashlib

    if function == "sha256":
        return hashlib.sha256()
    if function == "blake3":
        return blake3.blake3(max_threads=1)
    raise ValueError(f"unsupported digest function {function!r}")


def hash_bytes(function: str, data: bytes | memoryview) -> str:
    return native.hash_buffer(function, data)[0]


def hash_file(function: str, path: str | os.PathLike) -> tuple[str, int]:
    """(hex hash, size) of a regular file's content (a symlink is refused, not followed)."""
    return native.hash_file(function, path)


def hash_many(function: str, paths: list[str]) -> list[tuple[str, int]]:
    """(hex hash, size) of many files in as few native calls as pays, a large batch split
    over threads. A failure raises native.digest_many's OSError for the first path that
    failed, its .failures listing every failed (index into paths, errno)."""
    global _pool
    n = len(paths)
    if n < _PARALLEL_FILES or _THREADS == 1:
        return native.digest_many(function, paths)
    if _pool is None:
        # The calling thread digests slices too, so the pool needs one thread fewer.
        _pool = ThreadPoolExecutor(_THREADS - 1, thread_name_prefix="digest")
    count = min(_THREADS * _SLICES_PER_THREAD, n // (_PARALLEL_FILES // 2))
    step = -(-n // count)
    starts = range(0, n, step)
    parts: list[list[tuple[str, int]] | Exception | None] = [None] * len(starts)
    # next() on one shared iterator hands each slice to exactly one thread (the GIL makes
    # it atomic).
    todo = iter(enumerate(starts))

    def work() -> None:
        for k, start in todo:
            try:
                parts[k] = native.digest_many(function, paths[start:start + step])
            except Exception as e:  # re-raised below, in slice order
                parts[k] = e

    helpers = [_pool.submit(work) for _ in range(_THREADS - 1)]
    work()
    for h in helpers:
        # A helper still queued behind other callers' work has nothing left to do.
        if not h.cancel():
            h.result()
    errors = [(start, p) for start, p in zip(starts, parts, strict=True)
              if isinstance(p, Exception)]
    if errors:
        first = errors[0][1]
        if isinstance(first, OSError):
            # Indices into the whole batch, with every slice's failures.
            failures = [(start + i, err) for start, e in errors if isinstance(e, OSError)
                        for i, err in getattr(e, "failures", [(0, e.errno)])]
            first.failures = failures  # type: ignore[attr-defined]
        raise first
    out: list[tuple[str, int]] = []
    for part in parts:
        out.extend(part)  # type: ignore[arg-type]  # every part is a list by now
    return out
