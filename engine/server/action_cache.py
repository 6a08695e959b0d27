"""The ActionCache: ActionResults by action digest, persisted as files beside the CAS.

Every result is checked once, when it is written (engine/server/action_result_check.py),
and stored with the list of blobs a client may fetch for it (files inside output Trees
included). An entry is served only while all of them are still in the CAS (the CAS evicts
on its own), so a hit never sends a client after an output that is gone; serving it reads
that list and parses no Tree, so a lookup costs what the checked entry holds, whatever the
blobs' shapes. Entries without the current format (written before results were checked)
are dropped when met.
"""

from __future__ import annotations

import errno
import os
import tempfile

from google.protobuf.message import DecodeError

from engine.cas.remote_wire import varint
from engine.cas.store import BlobStore
from engine.digest import Digest
from engine.errors import ResourceExhausted
from engine.proto import re_pb2
from engine.server.action_result_check import check

# An entry: _MAGIC, the ActionResult's length (varint), the ActionResult, then its blobs as
# a FindMissingBlobsRequest. No ActionResult starts with a 0 byte (field number 0 does not
# exist), so entries of the earlier format (a bare ActionResult) never match.
_MAGIC = b"\x00stoker-ac-2\n"
# More than any checked entry holds (a request-sized result, a million digests).
MAX_ENTRY_BYTES = 256 << 20


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
                fits = os.fstat(f.fileno()).st_size <= MAX_ENTRY_BYTES
                data = f.read() if fits else b""
        except FileNotFoundError:
            return None
        entry = _decode(action.function, data)
        if entry is None:
            self.remove(action)
            return None
        result, blobs = entry
        if self._cas.find_missing(blobs):
            return None
        return result

    def put(self, action: Digest, result: re_pb2.ActionResult) -> re_pb2.ActionResult:
        """Check and store result (InvalidArgument or FailedPrecondition when it may not be
        stored); returns what was stored."""
        checked = check(action.function, result, self._cas)
        path = self._path(action)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(dir=os.path.join(self._root, "tmp"))
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_encode(checked.result, checked.blobs))
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise ResourceExhausted(f"no space left to store the result of {action}: "
                                    f"{e.strerror}") from None
        return checked.result

    def remove(self, action: Digest) -> None:
        try:
            os.unlink(self._path(action))
        except FileNotFoundError:
            pass


def _encode(result: re_pb2.ActionResult, blobs: list[Digest]) -> bytes:
    data = result.SerializeToString(deterministic=True)
    listed = re_pb2.FindMissingBlobsRequest(
        blob_digests=[re_pb2.Digest(hash=d.hash, size_bytes=d.size) for d in blobs])
    return b"".join((_MAGIC, varint(len(data)), data, listed.SerializeToString()))


def _decode(function: str, data: bytes) -> tuple[re_pb2.ActionResult, list[Digest]] | None:
    """An entry's result and blobs; None if it is not an entry of this format."""
    if not data.startswith(_MAGIC):
        return None
    pos, length, shift = len(_MAGIC), 0, 0
    while pos < len(data) and shift < 64:
        b = data[pos]
        pos += 1
        length |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            break
    else:
        return None
    if pos + length > len(data):
        return None
    try:
        result = re_pb2.ActionResult.FromString(data[pos:pos + length])
        listed = re_pb2.FindMissingBlobsRequest.FromString(data[pos + length:])
    except DecodeError:
        return None
    # Checked when written; the CAS's own files are trusted as the entry is.
    return result, [Digest(function, d.hash, d.size_bytes) for d in listed.blob_digests]
