"""Instruction edits with FLUX.1-Kontext-dev: styles, image prompt, round trip, variants."""

from __future__ import annotations

from typing import Any

from paletta.v1 import edit_pb2
from paletta_server.capabilities import common, diffusion_io
from paletta_server.capabilities.base import Capability, PrepareContext, RunContext
from paletta_server.models.profiles import Profile

MODEL = "flux-kontext"
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 2.5


def default_steps(profile: Profile) -> int:
    return profile.accelerated_steps if profile.acceleration_lora and profile.accelerated_steps else DEFAULT_STEPS


def prepare(request: edit_pb2.EditRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    diffusion_io.input_image(v, ctx, request.image, "image")
    common.check_prompt(v, request.prompt)
    diffusion_io.check_common(v, request, default_steps(ctx.profile), DEFAULT_GUIDANCE, (0.0, 20.0))
    common.check_styles(v, ctx, request.styles, allowed=True, mode="edit")
    common.check_image_prompt(v, ctx, request)
    v.raise_if_any()
    common.resolve_seed(request)
    return request


def models(request: edit_pb2.EditRequest, profile: Profile) -> list[str]:
    keys = [MODEL]
    if request.HasField("image_prompt"):
        keys += ["ip-adapter", "clip-vit-large"]
    if profile.acceleration_lora:
        keys.append(profile.acceleration_lora)
    return keys + diffusion_io.upscaler_models(request)


def run(request: edit_pb2.EditRequest, ctx: RunContext) -> None:
    from paletta_server.engines import flux_edit
    from paletta_server.engines import styles as style_engine

    acceleration = common.acceleration_lora(ctx)  # first: in the pipeline's memory plan
    pipe = ctx.model(MODEL)
    style_engine.ensure_acceleration(pipe, acceleration)
    original = ctx.open_image(request.image.asset).convert("RGB")
    infer = diffusion_io.inference_size(*original.size, ctx.profile.max_inference_edge)
    image = diffusion_io.fit(original, infer)
    guidance = common.given(request, "guidance", DEFAULT_GUIDANCE)
    with common.diffusion_extras(pipe, request, ctx) as (prompt, extra, applied):
        for i in range(request.variants):
            seed = request.seed + i
            out = flux_edit.edit(pipe, ctx, image=image, prompt=prompt, steps=request.steps, seed=seed,
                                 guidance=guidance, preview_every=ctx.config.preview_every, **extra)
            out = diffusion_io.restore(out, original.size, request, ctx)
            ctx.emit_output(out, seed=seed, parameters={
                "model": MODEL, "prompt": request.prompt, "effective_prompt": prompt, "image": request.image.asset,
                "steps": request.steps, "seed": seed, "guidance": guidance, "variant": i,
                "profile": ctx.profile.name, "acceleration_lora": ctx.profile.acceleration_lora,
                **diffusion_io.round_trip_parameters(request, original.size, infer, original.size), **applied,
            })


CAPABILITY = Capability("edit", edit_pb2.EditRequest, prepare, models, run,
                        model_keys=(MODEL, "ip-adapter", "clip-vit-large", "hyper-sd", diffusion_io.REALESRGAN_KEY),
                        chains={"image": "image"})
