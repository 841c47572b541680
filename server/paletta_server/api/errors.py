"""Sending domain errors as gRPC statuses (built by errors.to_status, the one place that builds them)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import grpc
from grpc_status import rpc_status

from paletta_server.errors import InvalidArgument, PalettaError, to_status

log = logging.getLogger(__name__)


async def abort(context: grpc.aio.ServicerContext, exc: PalettaError) -> None:
    if not isinstance(exc, InvalidArgument):
        log.info("%s: %s", exc.reason, exc.message)
    await context.abort_with_status(rpc_status.to_status(to_status(exc)))


def refusal_handler(exc: PalettaError) -> grpc.RpcMethodHandler:
    """A handler that answers any call with ``exc``'s rich status (auth, unknown methods).

    Stream-stream and no deserializer, so it fits every call shape and aborts without waiting
    for, or parsing, a single request message.
    """

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await abort(context, exc)

    return grpc.stream_stream_rpc_method_handler(refuse)


def unary(method: Callable) -> Callable:
    """Decorate a unary servicer method: PalettaError → rich status."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except PalettaError as exc:
            await abort(context, exc)

    return wrapper


def streaming(method: Callable) -> Callable:
    """Decorate a server-streaming servicer method: PalettaError → rich status."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for item in method(self, request, context):
                yield item
        except PalettaError as exc:
            await abort(context, exc)

    return wrapper
