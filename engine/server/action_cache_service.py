"""ActionCache: GetActionResult and UpdateActionResult."""

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
        result = request.action_result
        for i, f in enumerate(result.output_files):
            parse_digest(fn, f.digest, f"action_result.output_files[{i}].digest")
            if not f.path or f.path.startswith("/"):
                raise InvalidArgument(f"action_result.output_files[{i}].path {f.path!r} must be "
                                      "a relative path")
        for i, d in enumerate(result.output_directories):
            parse_digest(fn, d.tree_digest, f"action_result.output_directories[{i}].tree_digest")
        await asyncio.to_thread(self._cache.put, action, result)
        return result
