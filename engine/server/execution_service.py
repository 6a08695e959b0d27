"""Execution (Execute, WaitExecution) and Operations (GetOperation) over the scheduler."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import aclosing

from google.protobuf.message import DecodeError

from engine import digest as dg
from engine import errors, resources
from engine.cas.store import BlobNotFound, BlobStore
from engine.errors import InvalidArgument, MissingInputs, NotFound, Unimplemented
from engine.platform import platform_of
from engine.proto import operations_grpc, operations_pb2, re_grpc, re_pb2
from engine.runners.protocol import Platform
from engine.server import grpc_errors
from engine.server.action_cache import ActionCache
from engine.server.cas_service import parse_digest, request_function
from engine.server.scheduler import COMPLETED, QUEUED, Job, Scheduler


def _operation(name: str, stage: re_pb2.ExecutionStage.Value, action: dg.Digest,
               response: re_pb2.ExecuteResponse | None) -> operations_pb2.Operation:
    op = operations_pb2.Operation(name=name)
    op.metadata.Pack(re_pb2.ExecuteOperationMetadata(
        stage=stage, action_digest=re_pb2.Digest(hash=action.hash, size_bytes=action.size)))
    if response is not None:
        op.done = True
        op.response.Pack(response)
    return op


def job_operation(job: Job) -> operations_pb2.Operation:
    return _operation(job.name, job.stage, job.action_digest, job.response)


class ExecutionService(re_grpc.ExecutionServicer):
    def __init__(self, store: BlobStore, cache: ActionCache, scheduler: Scheduler,
                 max_timeout_s: float):
        self._store = store
        self._cache = cache
        self._scheduler = scheduler
        self.max_timeout_s = max_timeout_s

    @grpc_errors.streaming
    async def Execute(self, request, context):
        fn = request_function(request)
        action_digest = parse_digest(fn, request.action_digest, "action_digest")
        try:
            action, platform = await asyncio.to_thread(self._read_action, fn, action_digest)
        except BlobNotFound:
            yield self._failed(action_digest, MissingInputs([action_digest]))
            return
        self._validate(fn, action)
        size = resources.estimate(list(platform), "platform.properties")
        if not request.skip_cache_lookup and not action.do_not_cache:
            cached = await asyncio.to_thread(self._cache.get, action_digest)
            if cached is not None:
                yield _operation(str(uuid.uuid4()), COMPLETED, action_digest,
                                 re_pb2.ExecuteResponse(result=cached, cached_result=True))
                return
        job = self._scheduler.submit(action_digest, action, action.do_not_cache, size)
        # Always report QUEUED first, even when a bot took the job at once.
        yield _operation(job.name, QUEUED, action_digest, None)
        # Closed with the stream, even when the client just went away: the scheduler counts
        # the job's watchers, and cancels it once it has had none for its orphan grace.
        async with aclosing(self._scheduler.watch(job)) as updates:
            async for j in updates:
                if j.stage != QUEUED:
                    yield job_operation(j)

    def _read_action(self, fn: str, digest: dg.Digest) -> tuple[re_pb2.Action, Platform]:
        """The Action and the platform properties it runs with (engine/platform.py)."""
        try:
            action = re_pb2.Action.FromString(self._store.read_bytes(digest))
        except DecodeError as e:
            raise InvalidArgument(f"action_digest {digest} is not an Action: {e}") from None
        command = None
        if not action.platform.properties:
            try:
                command = re_pb2.Command.FromString(
                    self._store.read_bytes(dg.from_proto(fn, action.command_digest)))
            except (dg.DigestError, BlobNotFound, DecodeError):
                pass  # reported where it matters: _validate here, the worker's fetch
        return action, platform_of(action, command)

    def _validate(self, fn: str, action: re_pb2.Action) -> None:
        parse_digest(fn, action.command_digest, "Action.command_digest")
        parse_digest(fn, action.input_root_digest, "Action.input_root_digest")
        if action.HasField("timeout"):
            ns = action.timeout.ToNanoseconds()  # not ToTimedelta: it rounds -1ns to zero
            t = ns / 1e9
            if ns < 0:
                raise InvalidArgument(f"Action.timeout {t}s is negative")
            if self.max_timeout_s and t > self.max_timeout_s:
                raise InvalidArgument(f"Action.timeout {t}s exceeds this server's max_timeout "
                                      f"{self.max_timeout_s}s")

    def _failed(self, action: dg.Digest, err: errors.StokerError) -> operations_pb2.Operation:
        return _operation(str(uuid.uuid4()), COMPLETED, action,
                          re_pb2.ExecuteResponse(status=errors.to_status(err)))

    @grpc_errors.streaming
    async def WaitExecution(self, request, context):
        job = self._scheduler.get(request.name)
        if job is None:
            raise NotFound(f"operation {request.name!r} is not known")
        async with aclosing(self._scheduler.watch(job)) as updates:
            async for j in updates:
                yield job_operation(j)


class OperationsService(operations_grpc.OperationsServicer):
    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler

    @grpc_errors.unary
    async def GetOperation(self, request, context):
        job = self._scheduler.get(request.name)
        if job is None:
            raise NotFound(f"operation {request.name!r} is not known")
        self._scheduler.touch(job)  # a client polling instead of watching keeps it alive
        return job_operation(job)

    @grpc_errors.unary
    async def ListOperations(self, request, context):
        raise Unimplemented("ListOperations is not supported")

    @grpc_errors.unary
    async def DeleteOperation(self, request, context):
        raise Unimplemented("DeleteOperation is not supported")

    @grpc_errors.unary
    async def CancelOperation(self, request, context):
        raise Unimplemented("CancelOperation is not supported")
