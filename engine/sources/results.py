"""What a joined worker stores itself where its scheduler leaves that to the worker (Buildbarn
always does): an ActionResult into the ActionCache, a blob into the CAS, both at the
scheduler's storage endpoint (or `cache_server`), under the action's instance name."""

from __future__ import annotations

import grpc

from engine import digest as dg
from engine.digest import Digest
from engine.pipeline.storage import Storage
from engine.proto import re_grpc, re_pb2
from engine.task import CallMetadata

CALL_TIMEOUT_S = 60.0


class ResultStore:
    def __init__(self, channel: grpc.aio.Channel, storage: Storage):
        self._ac = re_grpc.ActionCacheStub(channel)
        self._storage = storage

    async def put_action_result(self, instance_name: str, function: str,
                                action_digest: re_pb2.Digest, result: re_pb2.ActionResult,
                                metadata: CallMetadata = ()) -> None:
        """Raises grpc.aio.AioRpcError when the ActionCache refuses it."""
        request = re_pb2.UpdateActionResultRequest(
            instance_name=instance_name, action_digest=action_digest, action_result=result)
        request.digest_function = dg.ENUM_BY_FUNCTION[function]  # type: ignore[assignment]
        await self._ac.UpdateActionResult(request, timeout=CALL_TIMEOUT_S,
                                          metadata=metadata or None)

    async def put_blob(self, instance_name: str, function: str, data: bytes,
                       metadata: CallMetadata = ()) -> Digest:
        """data into the local CAS and up to the remote one; its digest."""
        digest = dg.of_bytes(function, data)
        self._storage.local.write_bytes(digest, data)
        if self._storage.remote is not None:
            await self._storage.remote.upload(instance_name, function, [digest], metadata)
        return digest
