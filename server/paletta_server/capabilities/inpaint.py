"""Inpainting and outpainting with FLUX.1-Fill-dev.

Inpaint regenerates the white part of a mask (uploaded, or a SegmentService output asset); a mask
of another size is resized to the image with nearest neighbour and the output parameters say so
(``mask_resized``). Outpaint builds the larger canvas (the image's edge pixels stretched outwards
as context) and its mask on the server. Both feather the mask edge with a Gaussian blur, run at
the profile's inference size, restore to full size and paste the result over the original
through the feathered mask, so pixels outside the mask stay exactly the uploaded ones.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from paletta.v1 import inpaint_pb2
from paletta_server.capabilities import common, diffusion_io
from paletta_server.capabilities.base import Capability, PrepareContext, RunContext
from paletta_server.models.profiles import Profile

MODEL = "flux-fill"
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 30.0
MAX_FEATHER = 256
MAX_EXTEND = 2048
SIDES = ("left", "right", "top", "bottom")


def _check_feather(v: common.Violations, request: Any) -> None:
    common.check_range(v, request.feather, 0, MAX_FEATHER, "feather")


def prepare_inpaint(request: inpaint_pb2.InpaintRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    image = diffusion_io.input_image(v, ctx, request.image, "image")
    mask = None
    if request.mask.WhichOneof("source") is not None:
        mask = diffusion_io.input_image(v, ctx, request.mask, "mask")
    elif image is not None and not _has_transparency(ctx, request):  # else its transparent pixels are the mask
        v.add("mask", "a mask is required (white = regenerate), unless the image has transparent pixels: "
                      "then those are repainted")
    common.check_prompt(v, request.prompt)
    _check_feather(v, request)
    diffusion_io.check_common(v, request, DEFAULT_STEPS, DEFAULT_GUIDANCE, (0.0, 100.0))
    common.check_styles(v, ctx, request.styles, allowed=False, mode="inpaint (FLUX Fill)")
    if image is not None and mask is not None and diffusion_io.is_empty(
            diffusion_io.mask_from(ctx.assets.open_image(request.mask.asset, "mask"))):
        v.add("mask", "the mask is empty (all black): paint the region to regenerate in white")
    v.raise_if_any()
    common.resolve_seed(request)
    return request


def _has_transparency(ctx: PrepareContext, request: inpaint_pb2.InpaintRequest) -> bool:
    if not diffusion_io.may_be_transparent(ctx.assets.path(request.image.asset, "image.asset")):
        return False  # from the header: no alpha channel, no decode
    return diffusion_io.transparent_region(ctx.assets.open_image(request.image.asset, "image")) is not None


def prepare_outpaint(request: inpaint_pb2.OutpaintRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    image = diffusion_io.input_image(v, ctx, request.image, "image")
    common.check_prompt(v, request.prompt, required=False)
    for side in SIDES:
        common.check_range(v, getattr(request, side), 0, MAX_EXTEND, side)
    if all(getattr(request, side) == 0 for side in SIDES):
        for side in SIDES:
            v.add(side, "at least one of left, right, top, bottom must be positive (0 px everywhere)")
    _check_feather(v, request)
    diffusion_io.check_common(v, request, DEFAULT_STEPS, DEFAULT_GUIDANCE, (0.0, 100.0))
    common.check_styles(v, ctx, request.styles, allowed=False, mode="outpaint (FLUX Fill)")
    if image is not None:
        width = image.width + max(request.left, 0) + max(request.right, 0)
        height = image.height + max(request.top, 0) + max(request.bottom, 0)
        if width * height > ctx.config.max_image_pixels:
            v.add("left", f"the canvas of {width}x{height} exceeds the limit of {ctx.config.max_image_pixels} pixels")
    v.raise_if_any()
    common.resolve_seed(request)
    return request


def models(request: Any, profile: Profile) -> list[str]:
    return [MODEL] + diffusion_io.upscaler_models(request)


def outpaint_canvas(image: Image.Image, left: int, right: int, top: int, bottom: int
                    ) -> tuple[Image.Image, Image.Image]:
    """The extended canvas (edge pixels stretched outwards) and its mask (white = new area)."""
    import numpy as np

    pixels = np.pad(np.asarray(image.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    canvas = Image.fromarray(pixels, "RGB")
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    return canvas, mask


def _fill(request: Any, ctx: RunContext, original: Image.Image, mask: Image.Image, extra_params: dict) -> None:
    from paletta_server.engines import flux_edit

    pipe = ctx.model(MODEL)
    soft = diffusion_io.feathered(mask, request.feather, keep_inside=bool(extra_params.get("canvas")))
    infer = diffusion_io.inference_size(*original.size, ctx.profile.max_inference_edge)
    image = diffusion_io.fit(original, infer)
    small_mask = diffusion_io.fit(soft, infer)
    guidance = common.given(request, "guidance", DEFAULT_GUIDANCE)
    for i in range(request.variants):
        seed = request.seed + i
        out = flux_edit.fill(pipe, ctx, image=image, mask=small_mask, prompt=request.prompt, steps=request.steps,
                             seed=seed, guidance=guidance, preview_every=ctx.config.preview_every)
        out = diffusion_io.restore(out, original.size, request, ctx)
        out = Image.composite(out.convert("RGB"), original, soft)
        ctx.emit_output(out, seed=seed, parameters={
            "model": MODEL, "prompt": request.prompt, "image": request.image.asset, "steps": request.steps,
            "seed": seed, "guidance": guidance, "feather": request.feather, "variant": i,
            "profile": ctx.profile.name, "composited": True,
            **diffusion_io.round_trip_parameters(request, original.size, infer, original.size), **extra_params,
        })


def run_inpaint(request: inpaint_pb2.InpaintRequest, ctx: RunContext) -> None:
    image = ctx.open_image(request.image.asset)
    original = image.convert("RGB")
    if request.mask.WhichOneof("source") is None:  # prepare checked that the image has transparent pixels
        mask = diffusion_io.transparent_region(image)
        assert mask is not None
        _fill(request, ctx, original, mask, {"mask": "transparent pixels of the image"})
        return
    mask = diffusion_io.mask_from(ctx.open_image(request.mask.asset))
    params: dict = {"mask": request.mask.asset, "mask_size": list(mask.size), "mask_resized": False}
    if mask.size != original.size:
        # A mask of another size (e.g. from a downscaled segmentation) is stretched to the image.
        mask = mask.resize(original.size, Image.Resampling.NEAREST)
        params["mask_resized"] = True
        params["mask_resize"] = f"nearest neighbour {params['mask_size'][0]}x{params['mask_size'][1]} -> " \
                                f"{original.width}x{original.height}"
    _fill(request, ctx, original, mask, params)


def run_outpaint(request: inpaint_pb2.OutpaintRequest, ctx: RunContext) -> None:
    image = ctx.open_image(request.image.asset).convert("RGB")
    canvas, mask = outpaint_canvas(image, request.left, request.right, request.top, request.bottom)
    _fill(request, ctx, canvas, mask, {
        "canvas": list(canvas.size), "left": request.left, "right": request.right, "top": request.top,
        "bottom": request.bottom,
    })


CAPABILITIES = [
    Capability("inpaint", inpaint_pb2.InpaintRequest, prepare_inpaint, models, run_inpaint,
               model_keys=(MODEL, diffusion_io.REALESRGAN_KEY), chains={"image": "image", "mask": "mask"}),
    Capability("outpaint", inpaint_pb2.OutpaintRequest, prepare_outpaint, models, run_outpaint,
               model_keys=(MODEL, diffusion_io.REALESRGAN_KEY), chains={"image": "image"}),
]
