"""The error taxonomy and the one mapping from errors to google.rpc statuses.

Code anywhere raises these; the gRPC edge (engine/server/grpc_errors.py) and the scheduler
adapters turn them into statuses here and nowhere else.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from engine.digest import Digest, DigestError


class StokerError(Exception):
    code: int = code_pb2.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def details(self) -> list[any_pb2.Any]:
        return []


class InvalidArgument(StokerError):
    code = code_pb2.INVALID_ARGUMENT


class NotFound(StokerError):
    code = code_pb2.NOT_FOUND


class ResourceExhausted(StokerError):
    code = code_pb2.RESOURCE_EXHAUSTED


class Unavailable(StokerError):
    code = code_pb2.UNAVAILABLE


class DeadlineExceeded(StokerError):
    code = code_pb2.DEADLINE_EXCEEDED


class Internal(StokerError):
    code = code_pb2.INTERNAL


class FailedPrecondition(StokerError):
    code = code_pb2.FAILED_PRECONDITION


class Unimplemented(StokerError):
    code = code_pb2.UNIMPLEMENTED


class PermissionDenied(StokerError):
    code = code_pb2.PERMISSION_DENIED


class MissingInputs(StokerError):
    """Blobs an action needs are not in the CAS: FAILED_PRECONDITION with a
    PreconditionFailure listing each, so clients (Bazel) re-upload and retry."""

    code = code_pb2.FAILED_PRECONDITION

    def __init__(self, digests: Iterable[Digest]):
        self.digests = sorted(set(digests), key=lambda d: (d.hash, d.size))
        shown = ", ".join(str(d) for d in self.digests[:5])
        more = f" and {len(self.digests) - 5} more" if len(self.digests) > 5 else ""
        super().__init__(f"{len(self.digests)} input blob(s) missing from the CAS: {shown}{more}")

    def details(self) -> list[any_pb2.Any]:
        failure = error_details_pb2.PreconditionFailure()
        for d in self.digests:
            fn = "" if d.function == "sha256" else f"{d.function}/"
            failure.violations.add(
                type="MISSING", subject=f"blobs/{fn}{d.hash}/{d.size}",
                description="blob is missing from the CAS",
            )
        packed = any_pb2.Any()
        packed.Pack(failure)
        return [packed]


# A full disk or an exhausted quota: RESOURCE_EXHAUSTED, never INTERNAL.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
# What a path the client chose (an input name, a symlink target) can make the kernel say.
CLIENT_PATH = frozenset({errno.ENAMETOOLONG, errno.ELOOP})


def os_error_paths(e: OSError) -> str:
    """The path(s) an OSError names, for a message: '' if it names none."""
    return " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)


def to_status(err: BaseException) -> status_pb2.Status:
    if isinstance(err, DigestError):
        err = InvalidArgument(str(err))
    if not isinstance(err, StokerError):
        err = Internal(f"{type(err).__name__}: {err}")
    status = status_pb2.Status(code=err.code, message=err.message)
    status.details.extend(err.details())
    return status


def ok_status() -> status_pb2.Status:
    return status_pb2.Status(code=code_pb2.OK)
