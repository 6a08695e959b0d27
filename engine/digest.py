"""The Digest value type and the digest functions Stoker supports.

A digest is (function, lowercase hex hash, size). The size is part of the identity: the
same hash with another size is another blob, and is rejected where it cannot be.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine import hashing

# REAPI DigestFunction.Value numbers for what we support.
SHA256 = "sha256"
BLAKE3 = "blake3"
FUNCTION_BY_ENUM = {1: SHA256, 9: BLAKE3}
ENUM_BY_FUNCTION = {v: k for k, v in FUNCTION_BY_ENUM.items()}
HASH_LENGTH = {SHA256: 64, BLAKE3: 64}
_HEX = re.compile(r"[0-9a-f]+\Z")


class DigestError(ValueError):
    """A digest that is malformed or uses a function we do not support."""


@dataclass(frozen=True, slots=True)
class Digest:
    function: str
    hash: str
    size: int

    def __str__(self) -> str:
        return f"{self.function}:{self.hash}/{self.size}"

    @property
    def is_empty(self) -> bool:
        return self.size == 0

    def to_proto(self, pb_cls):
        return pb_cls(hash=self.hash, size_bytes=self.size)


def function_from_enum(value: int) -> str:
    """Map a REAPI digest_function field; 0 (UNKNOWN) means the default, SHA-256."""
    if value == 0:
        return SHA256
    try:
        return FUNCTION_BY_ENUM[value]
    except KeyError:
        raise DigestError(f"unsupported digest_function {value}") from None


def make(function: str, hash_: str, size: int) -> Digest:
    """Validate and build a Digest."""
    if function not in HASH_LENGTH:
        raise DigestError(f"unsupported digest function {function!r}")
    if len(hash_) != HASH_LENGTH[function] or not _HEX.match(hash_):
        raise DigestError(f"malformed {function} hash {hash_!r}")
    if size < 0:
        raise DigestError(f"negative size_bytes {size}")
    return Digest(function, hash_, size)


def from_proto(function: str, pb) -> Digest:
    return make(function, pb.hash, pb.size_bytes)


def of_bytes(function: str, data: bytes | memoryview) -> Digest:
    return Digest(function, hashing.hash_bytes(function, data), len(data))


def of_file(function: str, path) -> Digest:
    h, size = hashing.hash_file(function, path)
    return Digest(function, h, size)


def empty(function: str) -> Digest:
    return of_bytes(function, b"")
