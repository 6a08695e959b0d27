"""Checks every BlobStore applies the same way: read ranges and content verification."""

from __future__ import annotations

from collections.abc import Iterable

from engine import hashing
from engine.cas.store import DigestMismatch
from engine.digest import Digest


def check_range(digest: Digest, offset: int, limit: int) -> None:
    """Reject a read range the BlobStore contract does not allow."""
    if offset < 0:
        raise ValueError(f"negative read offset {offset}")
    if limit < 0:
        raise ValueError(f"negative read limit {limit}")
    if offset > digest.size:
        raise ValueError(f"read offset {offset} is past the end of {digest} "
                         f"({digest.size} bytes)")


def too_long(digest: Digest, size: int) -> DigestMismatch:
    # Stop at the first byte past the declared size rather than hash an unbounded stream.
    return DigestMismatch(digest, "(not computed: content is longer than size_bytes)", size)


def verify_chunks(digest: Digest, chunks: Iterable[bytes], keep: bool = False) -> bytes:
    """Hash chunks against digest (DigestMismatch on a difference); their join if keep."""
    hasher = hashing.new_hasher(digest.function)
    parts = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > digest.size:
            raise too_long(digest, size)
        hasher.update(chunk)
        if keep:
            parts.append(chunk)
    check(digest, hasher.hexdigest(), size)
    return b"".join(parts)


def check(digest: Digest, actual_hash: str, actual_size: int) -> None:
    if actual_size != digest.size or actual_hash != digest.hash:
        raise DigestMismatch(digest, actual_hash, actual_size)
