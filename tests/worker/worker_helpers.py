"""Test helpers for the worker building blocks: a builder for input Directory trees and
digest conversions."""

from __future__ import annotations

from engine import digest as digests
from engine.digest import Digest
from engine.proto import re_pb2

FN = digests.SHA256


class Blobs:
    """Directory and file blobs for building input trees; get() is a get_directory callback."""

    def __init__(self) -> None:
        self.data: dict[Digest, bytes] = {}

    def put(self, data: bytes) -> Digest:
        d = digests.of_bytes(FN, data)
        self.data[d] = data
        return d

    def get(self, d: Digest) -> bytes | None:
        return self.data.get(d)

    def directory(self, files=(), dirs=(), symlinks=()) -> Digest:
        """files: (name, content bytes or Digest, exec); dirs: (name, Digest); symlinks:
        (name, target). Written in the order given (tests of sorting rely on it)."""
        msg = re_pb2.Directory()
        for name, content, exe in files:
            d = content if isinstance(content, Digest) else self.put(content)
            msg.files.add(name=name, digest=pb(d), is_executable=exe)
        for name, d in dirs:
            msg.directories.add(name=name, digest=pb(d))
        for name, target in symlinks:
            msg.symlinks.add(name=name, target=target)
        return self.put(msg.SerializeToString())


def pb(d: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=d.hash, size_bytes=d.size)


def dg(p: re_pb2.Digest) -> Digest:
    return digests.make(FN, p.hash, p.size_bytes)
