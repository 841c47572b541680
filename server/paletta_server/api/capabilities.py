"""Every capability RPC is the same: validate, queue (or re-attach), stream the job's events.

The table below maps each (service, rpc) of the contracts to a capability name; servicer
classes are generated from it, so adding a capability is one line here plus its module in
``capabilities/``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from paletta.v1 import image_pb2, job_pb2
from paletta_server.api.errors import abort
from paletta_server.app import PalettaApp
from paletta_server.errors import PalettaError, invalid

log = logging.getLogger(__name__)

PRIORITIES = (image_pb2.PRIORITY_LOW, image_pb2.PRIORITY_NORMAL, image_pb2.PRIORITY_HIGH)

# (proto module, service, rpc) -> capability name
CAPABILITY_RPCS: dict[tuple[str, str, str], str] = {
    ("generate_service", "GenerateService", "Generate"): "generate",
    ("edit_service", "EditService", "Edit"): "edit",
    ("inpaint_service", "InpaintService", "Inpaint"): "inpaint",
    ("inpaint_service", "InpaintService", "Outpaint"): "outpaint",
    ("qwen_edit_service", "QwenEditService", "Edit"): "qwen_edit",
    ("control_service", "ControlService", "Control"): "control",
    ("upscale_service", "UpscaleService", "Upscale"): "upscale",
    ("background_service", "BackgroundService", "RemoveBackground"): "remove_background",
    ("segment_service", "SegmentService", "Segment"): "segment",
    ("detect_service", "DetectService", "Detect"): "detect",
    ("detect_service", "DetectService", "Ground"): "ground",
    ("caption_service", "CaptionService", "Caption"): "caption",
    ("caption_service", "CaptionService", "Analyze"): "analyze",
    ("prompt_service", "PromptService", "Expand"): "expand",
    ("pipeline_service", "PipelineService", "RunPipeline"): "pipeline",
}


async def submit_and_stream(app: PalettaApp, name: str, request: Any, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[job_pb2.JobEvent]:
    capability = app.capabilities.get(name)
    if capability is None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"capability {name!r} is not available in this build")
    manager = app.manager
    created = False
    try:
        priority = request.priority or capability.default_priority
        if priority not in PRIORITIES:
            raise invalid("priority", f"unknown priority {priority}; use PRIORITY_LOW, _NORMAL or _HIGH")
        job_id, created = await asyncio.to_thread(_queue, app, name, capability, request, priority)
    except PalettaError as exc:
        await abort(context, exc)
    try:
        async for event in manager.watch(job_id, 0):
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        # The client went away. Its job goes on unless the call that created it asked otherwise
        # (a call that re-attached by request_id never cancels someone else's job).
        if created and request.cancel_on_disconnect:
            log.info("client left; cancelling jobs/%s as it asked", job_id)
            await asyncio.shield(asyncio.to_thread(manager.cancel, job_id))
        raise


def _queue(app: PalettaApp, name: str, capability: Any, request: Any, priority: int) -> tuple[str, bool]:
    """Validate and queue (in one worker thread hop); a known request_id re-attaches without validating."""
    manager = app.manager
    if request.request_id:
        existing = manager.store.by_request_id(request.request_id)
        if existing is not None and existing.capability == name:
            return existing.id, False
    prepared = capability.prepare(request, app.prepare_context)
    models = capability.models(prepared, app.profile)
    return manager.submit(name, prepared, priority, request.request_id, models[0] if models else "",
                          request.cancel_on_disconnect)


def _servicer_class(module: str, service: str, rpcs: dict[str, str], app: PalettaApp) -> Any:
    grpc_module = importlib.import_module(f"paletta.v1.{module}_pb2_grpc")
    base = getattr(grpc_module, f"{service}Servicer")

    def make(cap_name: str) -> Any:
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            async for event in submit_and_stream(app, cap_name, request, context):
                yield event

        return handler

    cls = type(f"{service}Servicer", (base,), {rpc: make(cap) for rpc, cap in rpcs.items()})
    return cls(), getattr(grpc_module, f"add_{service}Servicer_to_server")


def add_capability_services(server: grpc.aio.Server, app: PalettaApp) -> list[str]:
    """Register every capability service; returns their full names (for health and reflection)."""
    grouped: dict[tuple[str, str], dict[str, str]] = {}
    for (module, service, rpc), cap in CAPABILITY_RPCS.items():
        grouped.setdefault((module, service), {})[rpc] = cap
    names = []
    for (module, service), rpcs in grouped.items():
        servicer, add = _servicer_class(module, service, rpcs, app)
        add(servicer, server)
        names.append(f"paletta.v1.{service}")
    return names
