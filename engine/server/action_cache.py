"""The ActionCache: ActionResults by action digest, persisted as files beside the CAS.

An entry is served only while every blob it references is still in the CAS (the CAS evicts
on its own), so a hit never sends a client after an output that is gone.
"""

from __future__ import annotations

import errno
import os
import tempfile

from google.protobuf.message import DecodeError

from engine import digest as dg
from engine.cas.store import BlobStore
from engine.digest import Digest
from engine.errors import ResourceExhausted
from engine.proto import re_pb2


class ActionCache:
    def __init__(self, root: str, cas: BlobStore):
        self._root = root
        self._cas = cas
        # Private: nothing here is for actions to read, list or lock (engine/datadir.py).
        os.makedirs(root, mode=0o700, exist_ok=True)
        os.makedirs(os.path.join(root, "tmp"), mode=0o700, exist_ok=True)

    def _path(self, action: Digest) -> str:
        return os.path.join(self._root, action.function, action.hash[:2],
                            f"{action.hash}-{action.size}")

    def get(self, action: Digest) -> re_pb2.ActionResult | None:
        try:
            with open(self._path(action), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            result = re_pb2.ActionResult.FromString(data)
        except DecodeError:
            self.remove(action)
            return None
        if self._cas.find_missing(referenced_blobs(action.function, result, self._cas)):
            return None
        return result

    def put(self, action: Digest, result: re_pb2.ActionResult) -> None:
        path = self._path(action)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(dir=os.path.join(self._root, "tmp"))
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(result.SerializeToString(deterministic=True))
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise ResourceExhausted(f"no space left to store the result of {action}: "
                                    f"{e.strerror}") from None

    def remove(self, action: Digest) -> None:
        try:
            os.unlink(self._path(action))
        except FileNotFoundError:
            pass


def referenced_blobs(function: str, result: re_pb2.ActionResult, cas: BlobStore) -> list[Digest]:
    """Every blob a client may fetch for this result, including files inside output trees."""
    blobs: list[Digest] = []
    for f in result.output_files:
        blobs.append(dg.from_proto(function, f.digest))
    for field in ("stdout_digest", "stderr_digest"):
        if result.HasField(field):
            blobs.append(dg.from_proto(function, getattr(result, field)))
    for d in result.output_directories:
        tree_digest = dg.from_proto(function, d.tree_digest)
        blobs.append(tree_digest)
        try:
            tree = re_pb2.Tree.FromString(cas.read_bytes(tree_digest))
        except Exception:
            continue  # the missing tree itself is reported
        for directory in [tree.root, *tree.children]:
            blobs.extend(dg.from_proto(function, f.digest) for f in directory.files)
    return [b for b in blobs if not b.is_empty]
