"""The embedded REAPI endpoint's own security: TLS, and API keys on every call.

`stoker up --api-key-file FILE` (executor.listen_api_key_file) makes every call on the
public port (Execution, CAS, ActionCache, ByteStream, Capabilities, Operations, and any
unknown method) carry one of FILE's keys, as `x-buildbuddy-api-key: KEY` or
`authorization: Bearer KEY`; else it ends UNAUTHENTICATED before its request is even
parsed, with a message that never echoes what was sent. Keys are compared by SHA-256 digest
with hmac.compare_digest against every configured key, so the time taken depends neither on
how much of a key matched nor on which key it was.

The Bots service is not behind this: it listens only on the data directory's unix socket
(engine/server/app.py), which Stoker's own workers reach and actions cannot.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable

import grpc

from engine import transport

log = logging.getLogger(__name__)

DENIED = ("missing or wrong API key: send one of the server's keys as "
          f"{transport.API_KEY_HEADER}: KEY or authorization: Bearer KEY")


def _digest(value: str | bytes) -> bytes:
    # Equal lengths for compare_digest: the offered key's length is not leaked either.
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).digest()


def _offered(metadata: Iterable[tuple[str, str | bytes]]) -> list[str | bytes]:
    found: list[str | bytes] = []
    for name, value in metadata:
        if name == transport.API_KEY_HEADER:
            found.append(value)
        elif name == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                found.append(token.strip())
    return found


async def _deny(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)


# By (request streaming, response streaming): the method's own shape, and no request
# deserializer, so a stranger's bytes are never parsed.
_DENIALS = {
    (False, False): grpc.unary_unary_rpc_method_handler(_deny),
    (False, True): grpc.unary_stream_rpc_method_handler(_deny),
    (True, False): grpc.stream_unary_rpc_method_handler(_deny),
    (True, True): grpc.stream_stream_rpc_method_handler(_deny),
}


def _denial(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    if handler is None:  # an unknown method: stream-stream fits any call
        return _DENIALS[True, True]
    return _DENIALS[bool(handler.request_streaming), bool(handler.response_streaming)]


class ApiKeyAuth(grpc.aio.ServerInterceptor):
    """Lets a call through only with one of `keys`; first in the server's interceptors."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(_digest(k) for k in keys)
        if not self._digests:
            raise ValueError("ApiKeyAuth needs at least one key")

    def __repr__(self) -> str:
        return f"ApiKeyAuth({len(self._digests)} key(s))"

    def allows(self, metadata: Iterable[tuple[str, str | bytes]]) -> bool:
        return self.which(metadata) is not None

    def which(self, metadata: Iterable[tuple[str, str | bytes]]) -> int | None:
        """The index (in the keys file) of the key the call carries, or None: who the caller
        is, for per-client limits, without the key itself."""
        found = None
        for value in _offered(metadata):
            offered = _digest(value)
            for i, digest in enumerate(self._digests):  # every one, no early exit
                if hmac.compare_digest(offered, digest) and found is None:
                    found = i
        return found

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if self.allows(handler_call_details.invocation_metadata or ()):
            return handler
        log.debug("unauthenticated call to %s refused", handler_call_details.method)
        return _denial(handler)


def load(path: str) -> ApiKeyAuth:
    return ApiKeyAuth(transport.read_api_keys(path, transport.LISTEN_KEYS_KEY))


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    cert, key = transport.read_key_pair(cert_file, key_file, *transport.LISTEN_TLS_KEYS)
    return grpc.ssl_server_credentials([(key, cert)])
