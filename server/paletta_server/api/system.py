"""SystemService (status, models, unload) and StyleService (the style registry)."""

from __future__ import annotations

import asyncio

import grpc

from paletta.v1 import style_service_pb2, style_service_pb2_grpc, system_service_pb2, system_service_pb2_grpc
from paletta_server import __version__
from paletta_server.app import PalettaApp
from paletta_server.errors import FieldViolation, NotFound, invalid
from paletta_server.models.device import describe, gpu_stats
from paletta_server.models.registry import env_var


class SystemServicer(system_service_pb2_grpc.SystemServiceServicer):
    def __init__(self, app: PalettaApp):
        self.app = app

    def _model(self, key: str, resident_bytes: dict[str, int]) -> system_service_pb2.ModelInfo:
        source = self.app.registry.source(key)
        users = [cap.name for cap in self.app.capabilities.values() if key in cap.model_keys]
        return system_service_pb2.ModelInfo(
            key=key, capabilities=users, source=str(source.path or source.repo),
            revision=source.revision, resident=key in resident_bytes, bytes=resident_bytes.get(key, 0),
            env_var=env_var(key),
        )

    def snapshot(self) -> system_service_pb2.GetStatusResponse:
        app = self.app
        resident = dict(app.residency.snapshot())
        device = app.device
        quantization = device.quantization + (f" ({device.note})" if device.note else "")
        status = system_service_pb2.GetStatusResponse(
            device=describe(device), profile=app.profile.name, quantization=quantization, version=__version__,
            loaded_models=[self._model(k, resident) for k in resident],
            memory_budget_bytes=app.residency.budget_bytes(), memory_used_bytes=sum(resident.values()),
            queue_length=app.manager.queue_length(),
            running_job=app.manager.running_job(),
            max_edge=app.profile.max_inference_edge,
            loading_model=app.residency.loading, evicted_models=list(app.residency.evicted),
            memory_cap_bytes=app.config.memory_budget, inference_edge=app.residency.policy.inference_edge,
            keep_two_families=app.residency.policy.keep_two_families,
            offloaded_models=app.residency.offloaded(),
            max_image_pixels=app.config.max_image_pixels,
        )
        gpu = gpu_stats() if device.name == "cuda" else None
        if gpu is not None:
            status.gpu.CopyFrom(gpu)
        return status

    async def GetStatus(self, request, context: grpc.aio.ServicerContext) -> system_service_pb2.GetStatusResponse:
        return await asyncio.to_thread(self.snapshot)

    async def WatchStatus(self, request: system_service_pb2.WatchStatusRequest, context: grpc.aio.ServicerContext):
        interval = request.interval_ms or 1000
        if not 100 <= interval <= 60000:
            raise invalid("interval_ms", "must be in [100, 60000]")
        while True:
            yield await asyncio.to_thread(self.snapshot)
            await asyncio.sleep(interval / 1000)

    async def ListModels(self, request, context: grpc.aio.ServicerContext) -> system_service_pb2.ListModelsResponse:
        resident = dict(self.app.residency.snapshot())
        return system_service_pb2.ListModelsResponse(
            models=[self._model(k, resident) for k in sorted(self.app.registry.specs)])

    async def UnloadModels(self, request: system_service_pb2.UnloadModelsRequest, context: grpc.aio.ServicerContext
                           ) -> system_service_pb2.UnloadModelsResponse:
        for i, key in enumerate(request.keys):
            if key not in self.app.registry.specs:
                raise NotFound(f"keys[{i}]: unknown model {key!r}", reason="MODEL_NOT_FOUND",
                               violations=[FieldViolation(f"keys[{i}]", f"unknown model {key!r}")])
        unloaded, freed = await asyncio.to_thread(self.app.residency.unload, list(request.keys) or None)
        return system_service_pb2.UnloadModelsResponse(unloaded=unloaded, freed_bytes=freed)


class StyleServicer(style_service_pb2_grpc.StyleServiceServicer):
    def __init__(self, app: PalettaApp):
        self.styles = app.styles

    async def ListStyles(self, request, context: grpc.aio.ServicerContext) -> style_service_pb2.ListStylesResponse:
        return style_service_pb2.ListStylesResponse(styles=[
            style_service_pb2.Style(name=s.name, label=s.label, best_for=s.best_for, trigger_word=s.trigger_word,
                                    default_weight=s.default_weight, source=s.source)
            for s in self.styles.all()
        ])
