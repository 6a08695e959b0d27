"""Inputs as private copies, for actions that run as Stoker's own user (Stoker not root).

A hardlinked input is the cached inode itself: its 0444 mode stops no process of the
inode's owner, which can chmod it and write through it into the cache. Copying every input
keeps the cache out of reach of writes to inputs at the cost of a copy per staged byte (in
the kernel, copy_file_range; bench/ measures it against hardlinking). It does not make the
data directory unreachable: only running Stoker as root, with actions as slot uids, does.
"""

from __future__ import annotations

import os

from engine.cas.store import BlobNotFound
from engine.digest import Digest

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class CopyInputs:
    """What staging needs of a store (link_into), giving copies instead of links."""

    def __init__(self, store):
        self._store = store

    def link_into(self, digest: Digest, executable: bool, dest_path: str) -> None:
        mode = 0o555 if executable else 0o444
        dst = os.open(dest_path, _CREATE, 0o600)
        try:
            if digest.size:
                try:
                    src = os.open(self._store.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:  # evicted since blob_path found it
                    raise BlobNotFound(digest) from None
                try:
                    copied = 0
                    while n := os.copy_file_range(src, dst, 1 << 30):
                        copied += n
                finally:
                    os.close(src)
                if copied != digest.size:
                    raise BlobNotFound(digest)  # the cached file is not what its name says
            os.fchmod(dst, mode)
        except BaseException:
            os.close(dst)
            os.unlink(dest_path)
            raise
        os.close(dst)
