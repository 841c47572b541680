"""Caption (BLIP-large FAST / BLIP-2 DEEP) and Analyze (caption plus DETR object labels, one job)."""

from __future__ import annotations

from typing import Any

from paletta.v1 import caption_pb2, result_pb2
from paletta_server.capabilities import common
from paletta_server.capabilities._vision import check_threshold, check_tokens, inference, prepare_image
from paletta_server.capabilities.base import HIGH, Capability, PrepareContext, RunContext
from paletta_server.models.profiles import Profile

FAST = caption_pb2.CAPTION_DEPTH_FAST
DEEP = caption_pb2.CAPTION_DEPTH_DEEP
CAPTIONERS = {FAST: "blip-large", DEEP: "blip2-opt-2.7b"}
DEFAULT_TOKENS = {FAST: 40, DEEP: 120}
DEPTH_NAMES = {FAST: "fast", DEEP: "deep"}
DETR = "detr-resnet-50"
ANALYZE_THRESHOLD = 0.7


def _check_depth(v: common.Violations, request: Any) -> None:
    if request.depth == caption_pb2.CAPTION_DEPTH_UNSPECIFIED:
        request.depth = FAST
    elif request.depth not in CAPTIONERS:
        v.add("depth", f"unknown caption depth {request.depth}; use CAPTION_DEPTH_FAST or CAPTION_DEPTH_DEEP")


def _caption(request: Any, ctx: RunContext, max_tokens: int) -> str:
    from paletta_server.engines import caption as engine

    cap = ctx.model(CAPTIONERS[request.depth])
    image = ctx.open_image(request.image.asset)
    return inference(ctx, lambda: engine.caption(cap, image, max_tokens, deep=request.depth == DEEP,
                                                 check=ctx.check_cancelled))


# -- Caption ------------------------------------------------------------------------------------
def prepare_caption(request: caption_pb2.CaptionRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    prepare_image(v, ctx, request.image)
    _check_depth(v, request)
    if request.depth in CAPTIONERS:
        request.max_tokens = check_tokens(v, request.max_tokens, DEFAULT_TOKENS[request.depth])
    v.raise_if_any()
    return request


def models_caption(request: Any, profile: Profile) -> list[str]:
    return [CAPTIONERS[request.depth]]


def run_caption(request: caption_pb2.CaptionRequest, ctx: RunContext) -> None:
    text = _caption(request, ctx, request.max_tokens)
    ctx.emit_output(None, parameters={"model": CAPTIONERS[request.depth], "depth": DEPTH_NAMES[request.depth],
                                      "max_tokens": request.max_tokens},
                    result=result_pb2.Caption(text=text))


# -- Analyze ------------------------------------------------------------------------------------
def prepare_analyze(request: caption_pb2.AnalyzeRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    prepare_image(v, ctx, request.image)
    _check_depth(v, request)
    check_threshold(v, request, ANALYZE_THRESHOLD)
    v.raise_if_any()
    return request


def models_analyze(request: Any, profile: Profile) -> list[str]:
    return [CAPTIONERS[request.depth], DETR]


def run_analyze(request: caption_pb2.AnalyzeRequest, ctx: RunContext) -> None:
    from paletta_server.engines import detect as detect_engine

    text = _caption(request, ctx, DEFAULT_TOKENS[request.depth])
    det = ctx.model(DETR)
    image = ctx.open_image(request.image.asset)
    boxes = inference(ctx, lambda: detect_engine.detect(det, image, request.threshold))
    objects = list(dict.fromkeys(b.label for b in boxes))  # distinct, most confident first
    ctx.emit_output(None, parameters={"model": CAPTIONERS[request.depth], "detector": DETR,
                                      "depth": DEPTH_NAMES[request.depth],
                                      "threshold": round(float(request.threshold), 4)},
                    result=result_pb2.Caption(text=text, objects=objects))


caption = Capability("caption", caption_pb2.CaptionRequest, prepare_caption, models_caption, run_caption,
                     model_keys=tuple(CAPTIONERS.values()), result_type=result_pb2.Caption,
                     chains={"image": "image"}, makes="", default_priority=HIGH)
analyze = Capability("analyze", caption_pb2.AnalyzeRequest, prepare_analyze, models_analyze, run_analyze,
                     model_keys=(*CAPTIONERS.values(), DETR), result_type=result_pb2.Caption,
                     chains={"image": "image"}, makes="", default_priority=HIGH)
CAPABILITIES = [caption, analyze]
