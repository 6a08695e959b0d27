"""The BlobStore protocol: what every content-addressed store implements.

Contract (tests/cas/test_store_contract.py runs it against every implementation):
- write() verifies the content against the digest and raises DigestMismatch on a
  difference; nothing is visible to readers until the whole blob is verified.
- The empty blob is always present: find_missing never lists it, read returns b"".
- read() raises BlobNotFound for an absent blob; offset/limit select a range
  (limit 0 means to the end); an offset past the size raises ValueError.
- Stores never know about gRPC, instance names or capabilities.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from engine.digest import Digest


class BlobNotFound(KeyError):
    def __init__(self, digest: Digest):
        super().__init__(str(digest))
        self.digest = digest


class DigestMismatch(ValueError):
    def __init__(self, expected: Digest, actual_hash: str, actual_size: int):
        super().__init__(
            f"content does not match digest {expected}: got hash {actual_hash} "
            f"size {actual_size}"
        )
        self.expected = expected


class BlobStore(Protocol):
    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]: ...

    def has(self, digest: Digest) -> bool: ...

    def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> Iterator[bytes]: ...

    def read_bytes(self, digest: Digest) -> bytes: ...

    def write(self, digest: Digest, chunks: Iterable[bytes]) -> None: ...

    def write_bytes(self, digest: Digest, data: bytes) -> None: ...
