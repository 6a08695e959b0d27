"""MemoryStore: a BlobStore kept in a dict, for tests, benchmarks and small servers."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from engine.cas.store import BlobNotFound
from engine.cas.verify import check_range, verify_chunks
from engine.digest import Digest

_READ_CHUNK = 1 << 20


class MemoryStore:
    def __init__(self) -> None:
        self._blobs: dict[Digest, bytes] = {}
        self._lock = threading.Lock()

    def has(self, digest: Digest) -> bool:
        return digest.size == 0 or digest in self._blobs

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        return [d for d in dict.fromkeys(digests) if not self.has(d)]

    def read_bytes(self, digest: Digest) -> bytes:
        if digest.size == 0:
            return b""
        try:
            return self._blobs[digest]
        except KeyError:
            raise BlobNotFound(digest) from None

    def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> Iterator[bytes]:
        check_range(digest, offset, limit)
        data = self.read_bytes(digest)
        end = len(data) if limit == 0 else min(len(data), offset + limit)
        return (data[i:min(end, i + _READ_CHUNK)] for i in range(offset, end, _READ_CHUNK))

    def write(self, digest: Digest, chunks: Iterable[bytes]) -> None:
        data = verify_chunks(digest, chunks, keep=True)
        if digest.size:
            with self._lock:
                self._blobs[digest] = data

    def write_bytes(self, digest: Digest, data: bytes) -> None:
        self.write(digest, (data,))

    def close(self) -> None:
        pass
