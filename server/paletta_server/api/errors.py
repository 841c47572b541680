"""The one place domain errors become gRPC statuses with google.rpc details."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from paletta_server.errors import InvalidArgument, PalettaError, ResourceExhausted
from paletta_server.jobs.events import DOMAIN

log = logging.getLogger(__name__)


def _pack(message: Any) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def to_rich_status(exc: PalettaError) -> status_pb2.Status:
    details = [_pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata))]
    violations = exc.violations
    if violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations
        ])))
    if isinstance(exc, ResourceExhausted) and exc.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(exc.retry_after_s * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=code_pb2.Code.Value(exc.code), message=exc.message, details=details)


async def abort(context: grpc.aio.ServicerContext, exc: PalettaError) -> None:
    if not isinstance(exc, InvalidArgument):
        log.info("%s: %s", exc.reason, exc.message)
    await context.abort_with_status(rpc_status.to_status(to_rich_status(exc)))


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
