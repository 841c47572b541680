"""One aio interceptor that gives every refusal a rich status, whatever the method.

grpc answers by itself, without ErrorInfo, in three cases that reach no servicer code: request
bytes that do not parse (UNKNOWN "Unexpected DecodeError", with a traceback in the log), methods
nobody registered (UNIMPLEMENTED) and exceptions a servicer did not expect (UNKNOWN). This wraps
each method handler so those become INVALID_ARGUMENT / MALFORMED_REQUEST, UNIMPLEMENTED and
INTERNAL, each with ``ErrorInfo{domain: "paletta"}``, through api/errors.py like every other error.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from paletta_server.api.errors import abort, refusal_handler
from paletta_server.errors import MalformedRequest, PalettaError, Unimplemented

log = logging.getLogger(__name__)

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class _Unparsed:
    """Stands in for a request that failed to parse, so the refusal happens in the behavior,
    where a rich status can be sent, rather than in grpc's deserialization, where it cannot."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError for protobuf; any parser failure means the same thing
            return _Unparsed(str(exc) or type(exc).__name__)

    return deserialize


class RequestHardeningInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        # Known methods only (their handlers never change once the server runs); unknown names
        # come from clients and are not kept, so they cannot grow this.
        self._hardened: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails
                                ) -> grpc.RpcMethodHandler:
        method = details.method
        if method in self._hardened:
            return self._hardened[method]
        handler = await continuation(details)
        if handler is None:
            return refusal_handler(Unimplemented(f"method {method} is not implemented by this server"))
        hardened = self._hardened[method] = _harden(handler, method)
        return hardened


def _malformed(method: str, unparsed: _Unparsed) -> MalformedRequest:
    return MalformedRequest(f"the request to {method} does not parse: {unparsed.reason}")


async def _checked(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Unparsed):
            raise _malformed(method, request)
        yield request


async def _refuse_unexpected(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    # The traceback goes to the log once; the client gets a status without server internals.
    log.error("%s failed unexpectedly", method, exc_info=exc)
    await abort(context, PalettaError(f"{method} failed unexpectedly; the server log has the details"))


def _harden(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    if handler.request_streaming and handler.response_streaming:
        behavior, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    streaming_requests = bool(handler.request_streaming)

    def arguments(request: Any) -> Any:
        if streaming_requests:
            return _checked(request, method)
        if isinstance(request, _Unparsed):
            raise _malformed(method, request)
        return request

    if inspect.isasyncgenfunction(behavior):
        async def wrapped_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for response in behavior(arguments(request), context):
                    yield response
            except PalettaError as exc:
                await abort(context, exc)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _refuse_unexpected(context, method, exc)

        wrapped: Callable[..., Any] = wrapped_stream
    elif inspect.iscoroutinefunction(behavior):
        async def wrapped_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(arguments(request), context)
            except PalettaError as exc:
                await abort(context, exc)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _refuse_unexpected(context, method, exc)

        wrapped = wrapped_call
    else:
        # A synchronous handler runs in grpc's thread pool and cannot await an abort; there are
        # none in this server, so such a handler is left exactly as registered.
        return handler
    deserializer = handler.request_deserializer
    return make(wrapped, request_deserializer=_tolerant(deserializer) if deserializer else None,
                response_serializer=handler.response_serializer)
