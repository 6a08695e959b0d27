"""Turns our errors into gRPC statuses at the servicer edge, in one place.

The google.rpc.Status (with details such as PreconditionFailure) travels in the
grpc-status-details-bin trailer, as the REAPI spec and grpcio-status expect.
"""

from __future__ import annotations

import functools
import logging

import grpc

from engine import errors
from engine.digest import DigestError

log = logging.getLogger(__name__)

GRPC_CODE = {code.value[0]: code for code in grpc.StatusCode}
# Messages often quote client input (names, paths), and the message travels twice in the
# trailers, which must stay under grpc's 16 KiB header limit or the client gets a bare
# RESOURCE_EXHAUSTED instead of our status.
MAX_MESSAGE_BYTES = 1000


def bounded(message: str) -> str:
    raw = message.encode()
    if len(raw) <= MAX_MESSAGE_BYTES:
        return message
    return raw[:MAX_MESSAGE_BYTES].decode(errors="ignore") + "... (truncated)"


async def abort(context: grpc.aio.ServicerContext, err: BaseException) -> None:
    status = errors.to_status(err)
    status.message = bounded(status.message)
    if not isinstance(err, errors.StokerError | DigestError):
        log.exception("internal error", exc_info=err)
    await context.abort(
        GRPC_CODE[status.code], status.message,
        trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
    )


def unary(fn):
    """For unary-response methods: StokerError → its status; anything else → INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as err:  # noqa: BLE001 - every failure must become a status
            await abort(context, err)

    return wrapper


def streaming(fn):
    """For stream-response methods (async generators)."""

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        try:
            async for item in fn(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as err:  # noqa: BLE001
            await abort(context, err)

    return wrapper
