"""Text-to-image with FLUX.1-schnell: variants with consecutive seeds, progress and previews."""

from __future__ import annotations

from typing import Any

from paletta.v1 import generate_pb2
from paletta_server.capabilities import common
from paletta_server.capabilities.base import Capability, PrepareContext, RunContext
from paletta_server.models.profiles import Profile

MODEL = "flux-schnell"
DEFAULT_EDGE = 1024
DEFAULT_STEPS = 4  # schnell is distilled for 1-4 steps


def prepare(request: generate_pb2.GenerateRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    common.check_prompt(v, request.prompt)
    common.default_size(v, request, DEFAULT_EDGE, ctx.profile.max_generate_edge)
    common.default_steps(v, request, DEFAULT_STEPS)
    common.default_variants(v, request)
    common.default_range(v, request, "guidance", 0.0, 0.0, 20.0)  # schnell is guidance-distilled
    common.check_styles(v, ctx, request.styles, allowed=True, mode="generate")
    common.check_image_prompt(v, ctx, request)
    v.raise_if_any()
    common.resolve_seed(request)
    return request


def models(request: generate_pb2.GenerateRequest, profile: Profile) -> list[str]:
    keys = [MODEL] + (["ip-adapter", "clip-vit-large"] if request.HasField("image_prompt") else [])
    return keys + ([profile.acceleration_lora] if profile.acceleration_lora else [])


def run(request: generate_pb2.GenerateRequest, ctx: RunContext) -> None:
    from paletta_server.engines import flux
    from paletta_server.engines import styles as style_engine

    # Under the hyper profile the acceleration LoRA stays active with or without styles. It is resolved
    # first: resident with its size, it is in the memory plan of the pipeline it goes into.
    acceleration = common.acceleration_lora(ctx)
    pipe = ctx.model(MODEL)
    style_engine.ensure_acceleration(pipe, acceleration)
    guidance = common.given(request, "guidance", 0.0)
    with common.diffusion_extras(pipe, request, ctx) as (prompt, extra, applied):
        for i in range(request.variants):
            seed = request.seed + i
            image = flux.text_to_image(
                pipe, ctx, prompt=prompt, width=request.width, height=request.height, steps=request.steps,
                seed=seed, guidance=guidance, preview_every=ctx.config.preview_every, **extra,
            )
            ctx.emit_output(image, seed=seed, parameters={
                "model": MODEL, "prompt": request.prompt, "effective_prompt": prompt, "width": request.width,
                "height": request.height, "steps": request.steps, "seed": seed, "guidance": guidance,
                "variant": i, "profile": ctx.profile.name, **applied,
            })


CAPABILITY = Capability("generate", generate_pb2.GenerateRequest, prepare, models, run,
                        model_keys=(MODEL, "ip-adapter", "clip-vit-large", "hyper-sd"))
