"""Detect (DETR-ResNet-50, COCO classes) and Ground (OWLv2 text queries); boxes in original pixels."""

from __future__ import annotations

from typing import Any

from paletta.v1 import detect_pb2, result_pb2
from paletta_server.capabilities import common
from paletta_server.capabilities._vision import check_threshold, inference, prepare_image
from paletta_server.capabilities.base import HIGH, Capability, PrepareContext, RunContext
from paletta_server.models.profiles import Profile

DETR = "detr-resnet-50"
OWLV2 = "owlv2"
DETECT_THRESHOLD = 0.7
GROUND_THRESHOLD = 0.1
MAX_QUERIES = 32
MAX_QUERY_CHARS = 200


def detections(boxes: list[Any], width: int, height: int) -> result_pb2.Detections:
    return result_pb2.Detections(
        detections=[result_pb2.Detection(label=b.label, score=b.score, box=result_pb2.Box(
            x_min=b.x_min, y_min=b.y_min, x_max=b.x_max, y_max=b.y_max)) for b in boxes],
        image_width=width, image_height=height,
    )



# -- Detect -------------------------------------------------------------------------------------
def prepare_detect(request: detect_pb2.DetectRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    prepare_image(v, ctx, request.image)
    check_threshold(v, request, DETECT_THRESHOLD)
    v.raise_if_any()
    return request


def models_detect(request: Any, profile: Profile) -> list[str]:
    return [DETR]


def run_detect(request: detect_pb2.DetectRequest, ctx: RunContext) -> None:
    from paletta_server.engines import detect as engine

    det = ctx.model(DETR)
    image = ctx.open_image(request.image.asset)
    boxes = inference(ctx, lambda: engine.detect(det, image, request.threshold))
    ctx.emit_output(None, parameters={"model": DETR, "threshold": round(float(request.threshold), 4),
                                      "count": len(boxes)},
                    result=detections(boxes, image.width, image.height))


# -- Ground -------------------------------------------------------------------------------------
def prepare_ground(request: detect_pb2.GroundRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    prepare_image(v, ctx, request.image)
    if not request.queries:
        v.add("queries", "at least one text query is required")
    elif len(request.queries) > MAX_QUERIES:
        v.add("queries", f"at most {MAX_QUERIES} queries, got {len(request.queries)}")
    for i, query in enumerate(request.queries):
        if not query.strip():
            v.add(f"queries[{i}]", "must not be empty")
        elif len(query) > MAX_QUERY_CHARS:
            v.add(f"queries[{i}]", f"must be at most {MAX_QUERY_CHARS} characters")
    check_threshold(v, request, GROUND_THRESHOLD)
    v.raise_if_any()
    return request


def models_ground(request: Any, profile: Profile) -> list[str]:
    return [OWLV2]


def run_ground(request: detect_pb2.GroundRequest, ctx: RunContext) -> None:
    from paletta_server.engines import detect as engine

    det = ctx.model(OWLV2)
    image = ctx.open_image(request.image.asset)
    queries = [q.strip() for q in request.queries]
    boxes = inference(ctx, lambda: engine.ground(det, image, queries, request.threshold))
    ctx.emit_output(None, parameters={"model": OWLV2, "queries": queries,
                                      "threshold": round(float(request.threshold), 4), "count": len(boxes)},
                    result=detections(boxes, image.width, image.height))


detect = Capability("detect", detect_pb2.DetectRequest, prepare_detect, models_detect, run_detect,
                    model_keys=(DETR,), result_type=result_pb2.Detections, chains={"image": "image"}, makes="",
                    default_priority=HIGH)
ground = Capability("ground", detect_pb2.GroundRequest, prepare_ground, models_ground, run_ground,
                    model_keys=(OWLV2,), result_type=result_pb2.Detections, chains={"image": "image"}, makes="",
                    default_priority=HIGH)
CAPABILITIES = [detect, ground]
