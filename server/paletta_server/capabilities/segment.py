"""Segment: a CLIPSeg text-prompted mask (white = selected) at the input's size, for Inpaint."""

from __future__ import annotations

from typing import Any

from paletta.v1 import result_pb2, segment_pb2
from paletta_server.capabilities import common
from paletta_server.capabilities._vision import check_threshold, inference, prepare_image
from paletta_server.capabilities.base import HIGH, Capability, PrepareContext, RunContext
from paletta_server.models.profiles import Profile

MODEL = "clipseg"
DEFAULT_THRESHOLD = 0.4


def prepare(request: segment_pb2.SegmentRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    prepare_image(v, ctx, request.image)
    common.check_prompt(v, request.text, "text")
    check_threshold(v, request, DEFAULT_THRESHOLD)
    common.check_range(v, request.dilate, 0, 256, "dilate")
    common.check_range(v, request.feather, 0, 256, "feather")
    v.raise_if_any()
    return request


def models(request: Any, profile: Profile) -> list[str]:
    return [MODEL]


def run(request: segment_pb2.SegmentRequest, ctx: RunContext) -> None:
    from paletta_server.engines import segment

    seg = ctx.model(MODEL)
    image = ctx.open_image(request.image.asset)
    text = request.text.strip()
    mask, coverage = inference(ctx, lambda: segment.segment(seg, image, text, request.threshold,
                                                            request.dilate, request.feather))
    ctx.emit_output(mask, parameters={
        "model": MODEL, "text": text, "threshold": round(float(request.threshold), 4),
        "dilate": request.dilate, "feather": request.feather,
    }, result=result_pb2.Segmentation(coverage=coverage))


CAPABILITY = Capability("segment", segment_pb2.SegmentRequest, prepare, models, run, model_keys=(MODEL,),
                        result_type=result_pb2.Segmentation, chains={"image": "image"}, makes="mask",
                        default_priority=HIGH)
