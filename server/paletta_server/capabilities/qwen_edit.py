"""Instruction edits with Qwen-Image-Edit (true CFG, negative prompt), round trip and variants."""

from __future__ import annotations

from typing import Any

from paletta.v1 import qwen_edit_pb2
from paletta_server.capabilities import common, diffusion_io
from paletta_server.capabilities.base import Capability, PrepareContext, RunContext
from paletta_server.models.profiles import Profile

MODEL = "qwen-image-edit"
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 4.0


def prepare(request: qwen_edit_pb2.QwenEditServiceEditRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    diffusion_io.input_image(v, ctx, request.image, "image")
    common.check_prompt(v, request.prompt)
    common.check_prompt(v, request.negative_prompt, "negative_prompt", required=False)
    diffusion_io.check_common(v, request, DEFAULT_STEPS, DEFAULT_GUIDANCE, (1.0, 20.0))
    common.check_styles(v, ctx, request.styles, allowed=False, mode="Qwen-Image-Edit")
    v.raise_if_any()
    common.resolve_seed(request)
    return request


def models(request: Any, profile: Profile) -> list[str]:
    return [MODEL] + diffusion_io.upscaler_models(request)


def run(request: qwen_edit_pb2.QwenEditServiceEditRequest, ctx: RunContext) -> None:
    from paletta_server.engines import qwen

    pipe = ctx.model(MODEL)
    original = ctx.open_image(request.image.asset).convert("RGB")
    infer = diffusion_io.inference_size(*original.size, ctx.profile.max_inference_edge)
    image = diffusion_io.fit(original, infer)
    guidance = common.given(request, "guidance", DEFAULT_GUIDANCE)
    for i in range(request.variants):
        seed = request.seed + i
        out = qwen.edit(pipe, ctx, image=image, prompt=request.prompt, negative_prompt=request.negative_prompt,
                        steps=request.steps, seed=seed, guidance=guidance, preview_every=ctx.config.preview_every)
        out = diffusion_io.restore(out, original.size, request, ctx)
        ctx.emit_output(out, seed=seed, parameters={
            "model": MODEL, "prompt": request.prompt, "negative_prompt": request.negative_prompt,
            "image": request.image.asset, "steps": request.steps, "seed": seed, "guidance": guidance,
            "variant": i, "profile": ctx.profile.name,
            **diffusion_io.round_trip_parameters(request, original.size, infer, original.size),
        })


CAPABILITY = Capability("qwen_edit", qwen_edit_pb2.QwenEditServiceEditRequest, prepare, models, run,
                        model_keys=(MODEL, diffusion_io.REALESRGAN_KEY), chains={"image": "image"})
