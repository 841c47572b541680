"""Upscale: Real-ESRGAN x4plus (tiled, progress per tile) or LANCZOS."""

from __future__ import annotations

from typing import Any

from paletta.v1 import image_pb2, upscale_pb2
from paletta_server.capabilities import common
from paletta_server.capabilities._vision import prepare_image
from paletta_server.capabilities.base import Capability, PrepareContext, RunContext
from paletta_server.models.profiles import Profile

MODEL = "realesrgan-x4plus"
DEFAULT_SCALE = 4.0
DEFAULT_TILE = 256
DEFAULT_OVERLAP = 16
UPSCALERS = {image_pb2.UPSCALER_LANCZOS: "lanczos", image_pb2.UPSCALER_REALESRGAN: "realesrgan"}


def prepare(request: upscale_pb2.UpscaleRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    size = prepare_image(v, ctx, request.image)
    if request.upscaler == image_pb2.UPSCALER_UNSPECIFIED:
        request.upscaler = image_pb2.UPSCALER_REALESRGAN
    elif request.upscaler not in UPSCALERS:
        v.add("upscaler", f"unknown upscaler {request.upscaler}; use UPSCALER_LANCZOS or UPSCALER_REALESRGAN")
    common.default_range(v, request, "scale", DEFAULT_SCALE, 1.0, 4.0)
    if request.tile == 0:
        request.tile = DEFAULT_TILE
    else:
        common.check_range(v, request.tile, 32, 2048, "tile")
    if not request.HasField("overlap"):
        request.overlap = min(DEFAULT_OVERLAP, max(request.tile, 32) // 4)
    else:
        common.check_range(v, request.overlap, 0, max(request.tile, 0) // 4, "overlap")
    if size is not None and 1.0 <= request.scale <= 4.0:
        out_w, out_h = round(size[0] * request.scale), round(size[1] * request.scale)
        limit = ctx.config.max_image_pixels
        if out_w * out_h > limit:
            v.add("image", f"upscaling {size[0]}x{size[1]} by {request.scale:g} gives {out_w}x{out_h}, "
                           f"over the limit of {limit} pixels")
    v.raise_if_any()
    return request


def models(request: upscale_pb2.UpscaleRequest, profile: Profile) -> list[str]:
    return [MODEL] if request.upscaler == image_pb2.UPSCALER_REALESRGAN else []


def run(request: upscale_pb2.UpscaleRequest, ctx: RunContext) -> None:
    from paletta_server.engines import upscale

    image = ctx.open_image(request.image.asset)
    method = UPSCALERS[request.upscaler]
    parameters: dict[str, Any] = {"upscaler": method, "scale": round(float(request.scale), 4),
                                  "input_width": image.width, "input_height": image.height}
    if method == "realesrgan":
        model = ctx.model(MODEL)

        def on_tile(done: int, total: int) -> None:
            ctx.progress(done, total, "tiling")
            ctx.check_cancelled()

        ctx.check_cancelled()
        ctx.progress(0, upscale.tile_count(image.width, image.height, request.tile), "tiling")
        result = upscale.upscale_tiled(model, image, request.scale, request.tile, request.overlap, on_tile)
        parameters.update(model=MODEL, tile=request.tile, overlap=request.overlap)
    else:
        ctx.check_cancelled()
        ctx.progress(0, 1, "inference")
        result = upscale.lanczos(image, request.scale)
        ctx.progress(1, 1, "inference")
    ctx.emit_output(result, parameters=parameters)


CAPABILITY = Capability("upscale", upscale_pb2.UpscaleRequest, prepare, models, run, model_keys=(MODEL,),
                        chains={"image": "image"}, cutout="keeps")
