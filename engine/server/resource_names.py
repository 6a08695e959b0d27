"""ByteStream resource names for CAS blobs (REAPI v2):

    read:   {instance}/blobs/{function/}{hash}/{size}
            {instance}/compressed-blobs/{compressor}/{function/}{hash}/{size}
    write:  {instance}/uploads/{uuid}/blobs/{function/}{hash}/{size}{/metadata...}
            {instance}/uploads/{uuid}/compressed-blobs/{compressor}/{function/}{hash}/{size}...

The function segment is present only for functions whose hash length is ambiguous (BLAKE3).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine import digest as dg
from engine.digest import Digest
from engine.errors import InvalidArgument

_NAMED_FUNCTIONS = {"blake3": dg.BLAKE3}
COMPRESSORS = {"zstd"}


@dataclass(frozen=True)
class BlobResource:
    instance: str
    digest: Digest
    compressor: str | None  # None = identity
    upload_id: str | None


def parse(resource_name: str, *, write: bool) -> BlobResource:
    parts = resource_name.split("/")
    try:
        if write:
            i = parts.index("uploads")
            upload_id = parts[i + 1]
            rest = parts[i + 2:]
        else:
            i = next(k for k, p in enumerate(parts) if p in ("blobs", "compressed-blobs"))
            upload_id = None
            rest = parts[i:]
        instance = "/".join(parts[:i])
        compressor = None
        if rest[0] == "compressed-blobs":
            compressor = rest[1]
            rest = rest[2:]
        elif rest[0] == "blobs":
            rest = rest[1:]
        else:
            raise ValueError
        function = dg.SHA256
        if rest[0] in _NAMED_FUNCTIONS:
            function = _NAMED_FUNCTIONS[rest[0]]
            rest = rest[1:]
        hash_, size_text = rest[0], rest[1]
        if not size_text.isdigit():
            raise InvalidArgument(f"resource_name {resource_name!r}: size {size_text!r} "
                                  "is not a non-negative integer")
        size = int(size_text)
    except (ValueError, IndexError, StopIteration):
        expected = ("{instance}/uploads/{uuid}/blobs/{hash}/{size}" if write
                    else "{instance}/blobs/{hash}/{size}")
        raise InvalidArgument(f"resource_name {resource_name!r} is malformed; "
                              f"expected {expected}") from None
    if compressor is not None and compressor not in COMPRESSORS:
        raise InvalidArgument(f"resource_name {resource_name!r}: compressor {compressor!r} "
                              "is not supported")
    try:
        digest = dg.make(function, hash_, size)
    except dg.DigestError as e:
        raise InvalidArgument(f"resource_name {resource_name!r}: {e}") from None
    return BlobResource(instance, digest, compressor, upload_id)
