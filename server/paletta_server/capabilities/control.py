"""ControlNet Union-Pro generation: canny / depth / pose maps (or a photo with server-side canny)."""

from __future__ import annotations

from typing import Any

from paletta.v1 import control_pb2 as pb
from paletta_server.capabilities import common, diffusion_io
from paletta_server.capabilities.base import Capability, PrepareContext, RunContext
from paletta_server.models.profiles import Profile

MODEL = "flux-controlnet-union"
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 3.5
DEFAULT_SCALE = 0.7
VALID_TYPES = (pb.CONTROL_TYPE_CANNY, pb.CONTROL_TYPE_DEPTH, pb.CONTROL_TYPE_POSE)
VALID_PREPROCESS = (pb.PREPROCESS_UNSPECIFIED, pb.PREPROCESS_NONE, pb.PREPROCESS_CANNY)


def prepare(request: pb.ControlRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    image = diffusion_io.input_image(v, ctx, request.control_image, "control_image")
    common.check_prompt(v, request.prompt)
    if request.control_type not in VALID_TYPES:
        v.add("control_type", "must be CONTROL_TYPE_CANNY, CONTROL_TYPE_DEPTH or CONTROL_TYPE_POSE"
                              f" (got {request.control_type})")
    common.default_range(v, request, "control_scale", DEFAULT_SCALE, 0.0, 1.0)
    if request.preprocess not in VALID_PREPROCESS:
        v.add("preprocess", f"unknown preprocess {request.preprocess}")
    elif request.preprocess == pb.PREPROCESS_CANNY and request.control_type != pb.CONTROL_TYPE_CANNY:
        v.add("preprocess", "PREPROCESS_CANNY makes an edge map: use it with CONTROL_TYPE_CANNY only")
    for name in ("width", "height"):
        if request.HasField(name):  # unset: the control image's size; an explicit 0 is refused
            common.check_size(v, getattr(request, name), ctx.profile.max_generate_edge, name)
    diffusion_io.check_common(v, request, DEFAULT_STEPS, DEFAULT_GUIDANCE, (0.0, 20.0))
    common.check_styles(v, ctx, request.styles, allowed=False, mode="ControlNet")
    common.check_image_prompt(v, ctx, request)
    v.raise_if_any()
    if image is not None:  # unset: the control image's size
        common.fill(request, width=image.width, height=image.height)
    common.resolve_seed(request)
    return request


def models(request: pb.ControlRequest, profile: Profile) -> list[str]:
    keys = [MODEL]
    if request.HasField("image_prompt"):
        keys += ["ip-adapter", "clip-vit-large"]
    return keys + diffusion_io.upscaler_models(request)


def run(request: pb.ControlRequest, ctx: RunContext) -> None:
    from paletta_server.engines import control

    pipe = ctx.model(MODEL)
    source = ctx.open_image(request.control_image.asset).convert("RGB")
    size = (common.given(request, "width", source.width), common.given(request, "height", source.height))
    infer = diffusion_io.inference_size(*size, ctx.profile.max_inference_edge)
    if request.preprocess == pb.PREPROCESS_CANNY:
        # Edges are found at the resolution the user uploaded, then scaled with the map.
        source = control.canny_map(source)
    control_image = diffusion_io.fit(source, infer)
    scale = common.given(request, "control_scale", DEFAULT_SCALE)
    guidance = common.given(request, "guidance", DEFAULT_GUIDANCE)
    with common.diffusion_extras(pipe, request, ctx) as (prompt, extra, applied):
        for i in range(request.variants):
            seed = request.seed + i
            out = control.control(pipe, ctx, control_image=control_image, control_type=request.control_type,
                                  control_scale=scale, prompt=prompt, width=infer[0], height=infer[1],
                                  steps=request.steps, seed=seed, guidance=guidance,
                                  preview_every=ctx.config.preview_every, **extra)
            out = diffusion_io.restore(out, size, request, ctx)
            ctx.emit_output(out, seed=seed, parameters={
                "model": MODEL, "prompt": request.prompt, "control_image": request.control_image.asset,
                "control_type": control.CONTROL_NAMES[request.control_type],
                "control_mode": control.CONTROL_MODES[request.control_type], "control_scale": round(scale, 4),
                "preprocess": "canny" if request.preprocess == pb.PREPROCESS_CANNY else "none",
                "steps": request.steps, "seed": seed, "guidance": guidance, "variant": i,
                "profile": ctx.profile.name,
                **diffusion_io.round_trip_parameters(request, size, infer, size), **applied,
            })


CAPABILITY = Capability("control", pb.ControlRequest, prepare, models, run,
                        model_keys=(MODEL, "flux-dev", "ip-adapter", "clip-vit-large", diffusion_io.REALESRGAN_KEY),
                        chains={"control_image": "image"}, input_sized=("width", "height"))
