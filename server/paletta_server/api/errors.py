"""Sending domain errors as gRPC statuses, built by errors.to_status (the one place that builds
them). Every servicer's PalettaError reaches ``abort`` through api/interceptors.py."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from grpc_status import rpc_status

from paletta_server.errors import InvalidArgument, PalettaError, to_status

log = logging.getLogger(__name__)


async def abort(context: grpc.aio.ServicerContext, exc: PalettaError) -> None:
    if not isinstance(exc, InvalidArgument):
        log.info("%s: %s", exc.reason, exc.message)
    await context.abort_with_status(rpc_status.to_status(to_status(exc, for_trailers=True)))


def refusal_handler(exc: PalettaError) -> grpc.RpcMethodHandler:
    """A handler that answers any call with ``exc``'s rich status (auth, unknown methods).

    Stream-stream and no deserializer, so it fits every call shape and aborts without waiting
    for, or parsing, a single request message.
    """

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await abort(context, exc)

    return grpc.stream_stream_rpc_method_handler(refuse)
