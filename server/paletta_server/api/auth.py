"""Bearer-token authentication as one aio interceptor; health checks stay open."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

from paletta_server.api.errors import refusal_handler
from paletta_server.errors import Unauthenticated

_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = token.encode()
        self._deny = refusal_handler(Unauthenticated("missing or wrong bearer token"))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(_OPEN_PREFIXES):
            return await continuation(details)
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                text = value.decode(errors="replace") if isinstance(value, bytes) else value
                scheme, _, given = text.strip().partition(" ")
                # RFC 9110: the scheme is case-insensitive ("bearer" works too), the token is not
                if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._expected):
                    return await continuation(details)
        return self._deny
