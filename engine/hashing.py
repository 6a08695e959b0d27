"""Digest computation: the interface milestone 2's native core accelerates.

Everything that hashes bytes or files goes through here, so swapping in the Cython core
changes one module. IMPLEMENTATION says which one is loaded.
"""

from __future__ import annotations

import hashlib
import os

import blake3

IMPLEMENTATION = "python"

_READ_CHUNK = 1 << 20


def new_hasher(function: str):
    """A hashlib-style object with update() and hexdigest() for 'sha256' or 'blake3'."""
    if function == "sha256":
        return hashlib.sha256()
    if function == "blake3":
        return blake3.blake3(max_threads=1)
    raise ValueError(f"unsupported digest function {function!r}")


def hash_bytes(function: str, data: bytes | memoryview) -> str:
    h = new_hasher(function)
    h.update(data)
    return h.hexdigest()


def hash_file(function: str, path: str | os.PathLike) -> tuple[str, int]:
    """(hex hash, size) of a file's content."""
    with open(path, "rb") as f:
        if function == "sha256":
            h = hashlib.file_digest(f, "sha256")
            return h.hexdigest(), f.tell()
        h = new_hasher(function)
        size = 0
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
            size += len(chunk)
        return h.hexdigest(), size
