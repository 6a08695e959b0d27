"""Digest computation for the whole engine, through the native core (engine/native.py) or
its pure-Python fallback, whichever is loaded: IMPLEMENTATION says which."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import blake3

from engine import native

IMPLEMENTATION = native.IMPLEMENTATION

# digest_many spends most of its time in open/read syscalls with the GIL released; one
# thread reaches about 0.6x a C open+read loop here, two threads match it (native/README.md).
_PARALLEL_FILES = 2048
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
    """(hex hash, size) of many files in as few native calls as pays; OSError names the
    first path that failed."""
    global _pool
    if len(paths) < _PARALLEL_FILES or _THREADS == 1:
        return native.digest_many(function, paths)
    if _pool is None:
        _pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="digest")
    step = -(-len(paths) // _THREADS)
    parts = _pool.map(lambda i: native.digest_many(function, paths[i:i + step]),
                      range(0, len(paths), step))
    return [d for part in parts for d in part]
