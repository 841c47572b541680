"""The grpc.aio server: services, health, reflection, optional bearer token and TLS."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket

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


class BindError(Exception):
    """The server could not listen on its address (most often: another process has the port)."""


def _bind_failure(host: str, port: int) -> str | None:
    """Why grpc could not bind, found by binding the same address; None when a probe can bind it."""
    bare = host.strip("[]")
    try:
        family = socket.AF_INET6 if ":" in bare else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((bare, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return f"port {host}:{port} is already in use"
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def _taken_address(host: str, port: int) -> str | None:
    """An address ``host`` resolves to on which another process already listens at ``port``.

    grpc binds every address a name resolves to (localhost: 127.0.0.1 and ::1) and, when only
    some are free, serves on those with a warning: two servers would share the name. Probed
    first, the same way the kernel would answer grpc (SO_REUSEADDR, as grpc binds)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError:
        return None  # grpc will say it cannot resolve the host
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as exc:  # else: a family this host lacks (no IPv6), which grpc skips too
            if exc.errno == errno.EADDRINUSE:
                return str(address[0])
    return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


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
            # grpc binds with SO_REUSEPORT by default, so a second server on the same port would
            # start and split the clients (and two workers would share one GPU); off, it fails.
            ("grpc.so_reuseport", 0),
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
        tls = bool(self.config.tls_cert and self.config.tls_key)
        taken = _taken_address(self.config.host, self.config.port) if self.config.port else None
        if taken is not None:
            await server.stop(None)
            self.app.close()
            raise BindError(f"port {self.config.host}:{self.config.port} is already in use (on {taken})")
        try:
            if tls:
                creds = grpc.ssl_server_credentials([(self.config.tls_key.read_bytes(),
                                                      self.config.tls_cert.read_bytes())])
                self.port = server.add_secure_port(address, creds)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc says only "Failed to bind"; find out why
            await server.stop(None)  # never started, but otherwise its finalizer complains at exit
            self.app.close()
            why = _bind_failure(self.config.host, self.config.port)
            if why is None:  # the address is free: with TLS, the certificate or key is what grpc refused
                why = f"cannot listen on {self.config.host}:{self.config.port}" + (
                    " with TLS: check that --tls-cert is a PEM certificate chain and --tls-key its private key"
                    if tls else "")
            raise BindError(why) from exc
        app.start(asyncio.get_running_loop())
        await server.start()
        for name in ["", *names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        where = f"{self.config.host}:{self.port}"
        # The first line says who may use the server: a token given in the wrong place must not
        # quietly leave it open.
        if self.config.token:
            access, level = "bearer token required", logging.INFO
        else:
            access = f"no token: anyone who can reach {where} may use it"
            level = logging.INFO if _is_loopback(self.config.host) else logging.WARNING
        log.log(level, "paletta serving on %s (profile %s, device %s, %s); %s", where, app.profile.name,
                app.device.name, "TLS" if tls else "plaintext", access)
        return self.port

    async def stop(self, grace: float = 2.0, worker_wait: float = 5.0) -> None:
        """Stop accepting calls at once; give running calls ``grace`` seconds and the running job
        ``worker_wait`` seconds to end, both at the same time, so a job that ends in time still
        reaches its watchers. A job still running after that is recorded INTERRUPTED at the next start."""
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self.server.stop(grace), asyncio.to_thread(self.app.stop, worker_wait))
        self.app.close()  # the store (and its lock) outlive every call
