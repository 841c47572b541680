"""Stubs for every Paletta service on one channel (sync or ``grpc.aio``)."""

from __future__ import annotations

from typing import Any

from paletta.v1 import (
    asset_service_pb2_grpc,
    background_service_pb2_grpc,
    caption_service_pb2_grpc,
    control_service_pb2_grpc,
    detect_service_pb2_grpc,
    edit_service_pb2_grpc,
    generate_service_pb2_grpc,
    inpaint_service_pb2_grpc,
    job_service_pb2_grpc,
    pipeline_service_pb2_grpc,
    prompt_service_pb2_grpc,
    qwen_edit_service_pb2_grpc,
    segment_service_pb2_grpc,
    style_service_pb2_grpc,
    system_service_pb2_grpc,
    upscale_service_pb2_grpc,
)

_MODULES = (
    asset_service_pb2_grpc,
    background_service_pb2_grpc,
    caption_service_pb2_grpc,
    control_service_pb2_grpc,
    detect_service_pb2_grpc,
    edit_service_pb2_grpc,
    generate_service_pb2_grpc,
    inpaint_service_pb2_grpc,
    job_service_pb2_grpc,
    pipeline_service_pb2_grpc,
    prompt_service_pb2_grpc,
    qwen_edit_service_pb2_grpc,
    segment_service_pb2_grpc,
    style_service_pb2_grpc,
    system_service_pb2_grpc,
    upscale_service_pb2_grpc,
)


def make_stubs(channel: Any) -> dict[str, Any]:
    """{"GenerateService": GenerateServiceStub(channel), …} for every service module."""
    stubs: dict[str, Any] = {}
    for module in _MODULES:
        for attr in dir(module):
            if attr.endswith("ServiceStub"):
                stubs[attr.removesuffix("Stub")] = getattr(module, attr)(channel)
    return stubs
