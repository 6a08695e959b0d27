"""A server interceptor that answers requests which do not parse with INVALID_ARGUMENT.

Left to itself, grpc turns a failing request deserializer into UNKNOWN (INTERNAL inside a
request stream) and logs a traceback per request, so any client could flood the log. Here
the deserializer returns a marker instead of raising, and the wrapped method rejects it with
a message naming the message type, through the same error edge as every other bad input.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from engine.errors import InvalidArgument
from engine.server.grpc_errors import abort


class _Malformed:
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except DecodeError as e:
            return _Malformed(str(e))

    return parse


async def _reject(context, request: _Malformed) -> None:
    await abort(context, InvalidArgument(f"malformed request: {request.reason}"))


async def _checked(requests: AsyncIterator, context) -> AsyncIterator:
    async for request in requests:
        if type(request) is _Malformed:
            await _reject(context, request)
        yield request


def _wrap_unary_request(behavior):
    if inspect.isasyncgenfunction(behavior):
        async def stream_out(request, context):
            if type(request) is _Malformed:
                await _reject(context, request)
            async for item in behavior(request, context):
                yield item
        return stream_out

    async def unary_out(request, context):
        if type(request) is _Malformed:
            await _reject(context, request)
        return await behavior(request, context)
    return unary_out


def _wrap_stream_request(behavior):
    if inspect.isasyncgenfunction(behavior):
        async def stream_out(requests, context):
            async for item in behavior(_checked(requests, context), context):
                yield item
        return stream_out

    async def unary_out(requests, context):
        return await behavior(_checked(requests, context), context)
    return unary_out


def guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                or handler.stream_stream)
    if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        return handler  # only our own async servicers are wrapped
    parse = _tolerant(handler.request_deserializer)
    out = handler.response_serializer
    if handler.request_streaming:
        wrapped = _wrap_stream_request(behavior)
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(wrapped, parse, out)
        return grpc.stream_unary_rpc_method_handler(wrapped, parse, out)
    wrapped = _wrap_unary_request(behavior)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(wrapped, parse, out)
    return grpc.unary_unary_rpc_method_handler(wrapped, parse, out)


class DecodeGuard(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        # Per method, built once; unknown method names are not cached (clients choose them).
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        guarded = self._guarded[method] = guard(handler)
        return guarded
