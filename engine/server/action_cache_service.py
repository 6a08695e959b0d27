"""ActionCache: GetActionResult and UpdateActionResult.

Who may write (executor.action_cache_writes): `all`, every caller the endpoint admits (with
listen_api_key_file, only callers with a valid key: the interceptor refuses the rest, so
`all` is then `keyed`); `keyed`, only calls carrying a key of listen_api_key_file, checked
here again (without a key file, no call carries one, and every write is refused); `none`,
no client. Results of Stoker's own executions are cached whatever this says. A refused write
is PERMISSION_DENIED, before the request is looked at.

What may be written is checked by the store (action_cache.py, action_result_check.py).
GetActionResult serves the stored result as it is: it never inlines stdout, stderr or output
files (inline_* are hints that REAPI lets a server ignore), so serving never reads a blob.
"""

from __future__ import annotations

import asyncio

from engine.errors import InvalidArgument, NotFound, PermissionDenied
from engine.proto import re_grpc
from engine.server import grpc_errors
from engine.server.action_cache import ActionCache
from engine.server.auth import ApiKeyAuth
from engine.server.cas_service import parse_digest, request_function

WRITE_POLICIES = ("all", "keyed", "none")


class ActionCacheService(re_grpc.ActionCacheServicer):
    def __init__(self, cache: ActionCache, writes: str = "all", keys: ApiKeyAuth | None = None):
        if writes not in WRITE_POLICIES:
            raise ValueError(f"action_cache_writes: {writes!r} is not one of "
                             f"{', '.join(WRITE_POLICIES)}")
        self._cache = cache
        self._writes = writes
        self._keys = keys

    @grpc_errors.unary
    async def GetActionResult(self, request, context):
        fn = request_function(request)
        action = parse_digest(fn, request.action_digest, "action_digest")
        result = await asyncio.to_thread(self._cache.get, action)
        if result is None:
            raise NotFound(f"no ActionResult for action {action}")
        return result

    @grpc_errors.unary
    async def UpdateActionResult(self, request, context):
        self._check_writer(context.invocation_metadata() or ())
        fn = request_function(request)
        action = parse_digest(fn, request.action_digest, "action_digest")
        if not request.HasField("action_result"):
            raise InvalidArgument("action_result is required")
        return await asyncio.to_thread(self._cache.put, action, request.action_result)

    def _check_writer(self, metadata) -> None:
        if self._writes == "all":
            return
        if self._writes == "none":
            raise PermissionDenied("UpdateActionResult refused: this server caches only the "
                                   "results of its own executions (executor."
                                   "action_cache_writes: none)")
        if self._keys is not None and self._keys.allows(metadata):
            return
        why = ("this call carries no valid API key" if self._keys is not None else
               "this server has no API keys (executor.listen_api_key_file), so no call "
               "carries one")
        raise PermissionDenied(f"UpdateActionResult refused: executor.action_cache_writes is "
                               f"keyed and {why}")
