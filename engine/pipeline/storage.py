"""What the pipeline needs of storage, as one typed protocol.

Every action reads its inputs from, and writes its outputs into, the machine's shared local
CAS (engine/cas/local_disk.py; stage hardlinks from it). Embedded, that CAS *is* the server's,
so nothing more is needed. Joined to a scheduler, a RemoteCas also brings inputs down from the
scheduler's CAS before staging, and takes outputs up after collection.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from engine.digest import Digest
from engine.task import CallMetadata


class LocalCas(Protocol):
    root: str
    max_size_bytes: int  # 0: unlimited

    def has(self, digest: Digest) -> bool: ...
    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]: ...
    def read_bytes(self, digest: Digest) -> bytes: ...
    def write_bytes(self, digest: Digest, data: bytes) -> None: ...
    def insert_file(self, digest: Digest, src_path: str, *, move: bool = False,
                    verify: bool = True, executable: bool = False) -> None: ...
    def link_into(self, digest: Digest, executable: bool, dest_path: str) -> None: ...
    def blob_path(self, digest: Digest) -> str: ...


class RemoteCas(Protocol):
    """The scheduler's CAS, seen from a worker. Each call carries the task's own credentials
    (`metadata`), as a scheduler may scope cache access per task."""

    async def fetch_tree(self, instance_name: str, function: str, root: Digest,
                         metadata: CallMetadata = ()) -> None:
        """Every Directory under root into the local CAS."""

    async def fetch_blobs(self, instance_name: str, function: str, digests: list[Digest],
                          metadata: CallMetadata = ()) -> object:
        """Every digest into the local CAS, each downloaded once per machine. Raises
        errors.MissingInputs for blobs the remote lacks."""

    async def upload(self, instance_name: str, function: str, digests: list[Digest],
                     metadata: CallMetadata = ()) -> object:
        """Blobs of the local CAS into the remote one (what it lacks only)."""

    def close(self) -> None:
        """Ends what it started (thread pools); the channel is the caller's."""


@dataclass
class Storage:
    local: LocalCas
    remote: RemoteCas | None = None  # None: embedded, the local CAS is the server's
