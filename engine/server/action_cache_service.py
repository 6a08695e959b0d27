"""ActionCache: GetActionResult and UpdateActionResult.

What may be written is checked by the store (action_cache.py, action_result_check.py).
GetActionResult serves the stored result as it is: it never inlines stdout, stderr or output
files (inline_* are hints that REAPI lets a server ignore), so serving never reads a blob.
"""

from __future__ import annotations

import asyncio

from engine.errors import InvalidArgument, NotFound
from engine.proto import re_grpc
from engine.server import grpc_errors
from engine.server.action_cache import ActionCache
from engine.server.cas_service import parse_digest, request_function


class ActionCacheService(re_grpc.ActionCacheServicer):
    def __init__(self, cache: ActionCache):
        self._cache = cache

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
        fn = request_function(request)
        action = parse_digest(fn, request.action_digest, "action_digest")
        if not request.HasField("action_result"):
            raise InvalidArgument("action_result is required")
        return await asyncio.to_thread(self._cache.put, action, request.action_result)
