"""The grpc.aio server: services, health, reflection, optional bearer token and TLS."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from paletta.v1 import (
    asset_service_pb2_grpc,
    job_service_pb2_grpc,
    style_service_pb2_grpc,
    system_service_pb2_grpc,
)
from paletta_server.api.assets import AssetServicer
from paletta_server.api.auth import BearerTokenInterceptor
from paletta_server.api.capabilities import add_capability_services
from paletta_server.api.interceptors import RequestHardeningInterceptor
from paletta_server.api.jobs import JobServicer
from paletta_server.api.system import StyleServicer, SystemServicer
from paletta_server.app import PalettaApp
from paletta_server.config import Config

log = logging.getLogger(__name__)
MESSAGE_LIMIT = 80 * 1024 * 1024  # inline images up to the upload limit plus framing


class PalettaServer:
    """One running server; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, config: Config):
        self.config = config
        self.app = PalettaApp(config)
        # Auth first, so an unauthenticated caller learns nothing about which methods exist.
        interceptors: list[grpc.aio.ServerInterceptor] = [BearerTokenInterceptor(config.token)] if config.token else []
        interceptors.append(RequestHardeningInterceptor())
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", MESSAGE_LIMIT),
            ("grpc.max_send_message_length", MESSAGE_LIMIT),
        ])
        self.health = HealthServicer()
        self.port = 0

    async def start(self) -> int:
        app, server = self.app, self.server
        names = add_capability_services(server, app)
        job_service_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(app), server)
        asset_service_pb2_grpc.add_AssetServiceServicer_to_server(AssetServicer(app), server)
        system_service_pb2_grpc.add_SystemServiceServicer_to_server(SystemServicer(app), server)
        style_service_pb2_grpc.add_StyleServiceServicer_to_server(StyleServicer(app), server)
        names += ["paletta.v1.JobService", "paletta.v1.AssetService", "paletta.v1.SystemService",
                  "paletta.v1.StyleService"]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection([*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                             reflection.SERVICE_NAME], server)
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert and self.config.tls_key:
            creds = grpc.ssl_server_credentials([(self.config.tls_key.read_bytes(), self.config.tls_cert.read_bytes())])
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        app.start(asyncio.get_running_loop())
        await server.start()
        for name in ["", *names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("paletta serving on %s:%d (profile %s, device %s)", self.config.host, self.port,
                 app.profile.name, app.device.name)
        return self.port

    async def stop(self, grace: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await asyncio.to_thread(self.app.stop)
