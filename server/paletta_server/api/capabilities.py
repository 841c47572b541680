"""Every capability RPC is the same: validate, queue (or re-attach), stream the job's events.

Which RPC serves which capability is read from the contracts, not listed: every method of a
``paletta.v1`` service whose request type is a capability's ``request_type`` is served by that
capability. Adding a capability therefore needs no line here.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import pkgutil
from collections.abc import AsyncIterator
from typing import Any

import grpc

import paletta.v1
from paletta.v1 import job_options_pb2, job_pb2
from paletta_server.app import PalettaApp
from paletta_server.capabilities.base import Capability
from paletta_server.errors import invalid

log = logging.getLogger(__name__)

PRIORITIES = (job_options_pb2.PRIORITY_LOW, job_options_pb2.PRIORITY_NORMAL, job_options_pb2.PRIORITY_HIGH)
MAX_REQUEST_ID = 128


def capability_rpcs(capabilities: dict[str, Capability]) -> dict[tuple[str, str, str], Capability]:
    """(stub module, service, method) → capability, for every contract method taking a capability request."""
    by_request = {cap.request_type.DESCRIPTOR.full_name: cap for cap in capabilities.values()}
    table: dict[tuple[str, str, str], Capability] = {}
    for info in pkgutil.iter_modules(paletta.v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"paletta.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                cap = by_request.get(method.input_type.full_name)
                if cap is not None:
                    table[(f"paletta.v1.{info.name}_grpc", service.name, method.name)] = cap
    return table


async def submit_and_stream(app: PalettaApp, capability: Capability, request: Any,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[job_pb2.JobEvent]:
    # A PalettaError raised here becomes the call's rich status in api/interceptors.py.
    manager = app.manager
    options = request.options
    if len(options.request_id) > MAX_REQUEST_ID:
        raise invalid("options.request_id", f"must be at most {MAX_REQUEST_ID} characters")
    priority = options.priority or capability.default_priority
    if priority not in PRIORITIES:
        raise invalid("options.priority", f"unknown priority {priority}; use PRIORITY_LOW, _NORMAL or _HIGH")
    job_id, created = await asyncio.to_thread(_queue, app, capability, request, priority)
    try:
        async for event in manager.watch(job_id, 0):
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        # The client went away. Its job goes on unless the call that created it asked otherwise
        # (a call that re-attached by request_id never cancels someone else's job).
        if created and options.cancel_on_disconnect:
            log.info("client left; cancelling jobs/%s as it asked", job_id)
            await asyncio.shield(asyncio.to_thread(manager.cancel, job_id))
        raise


def _queue(app: PalettaApp, capability: Capability, request: Any, priority: int) -> tuple[str, bool]:
    """Validate and queue (in one worker thread hop); a known request_id re-attaches without validating."""
    manager, options = app.manager, request.options
    if options.request_id:
        existing = manager.store.by_request_id(options.request_id)
        if existing is not None and existing.capability == capability.name:
            return existing.id, False
    prepared = capability.prepare(request, app.prepare_context)
    models = capability.models(prepared, app.profile)
    return manager.submit(capability.name, capability.spec_of(prepared).SerializeToString(), priority,
                          options.request_id, models[0] if models else "", options.cancel_on_disconnect)


def add_capability_services(server: grpc.aio.Server, app: PalettaApp) -> list[str]:
    """Register every service that serves a capability; returns their full names (for health and reflection)."""
    grouped: dict[tuple[str, str], dict[str, Capability]] = {}
    for (module, service, method), cap in capability_rpcs(app.capabilities).items():
        grouped.setdefault((module, service), {})[method] = cap
    names = []
    for (module, service), methods in grouped.items():
        grpc_module = importlib.import_module(module)
        base = getattr(grpc_module, f"{service}Servicer")
        cls = type(f"{service}Servicer", (base,), {method: _handler(app, cap) for method, cap in methods.items()})
        getattr(grpc_module, f"add_{service}Servicer_to_server")(cls(), server)
        names.append(f"paletta.v1.{service}")
    return names


def _handler(app: PalettaApp, capability: Capability) -> Any:
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[job_pb2.JobEvent]:
        async for event in submit_and_stream(app, capability, request, context):
            yield event

    return handler
