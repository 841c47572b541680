"""Round trip and masks for the diffusion capabilities (edit, inpaint, outpaint, qwen_edit, control).

Round trip: an input is downscaled so its long edge fits the profile's ``max_inference_edge``
(1024, lowered to what the memory budget allows: 512 for bf16 on the seed's 16 GB card; 512 under
tiny), each side floored to a multiple of 16 (never upscaled), the
model runs at that size, and every output is restored to the upload's size with LANCZOS, or with
Real-ESRGAN x4plus then LANCZOS when the request asks for ``UPSCALER_REALESRGAN``.

This module has no CAPABILITY: capabilities/__init__.discover() skips it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter, ImageOps

from paletta.v1 import image_pb2
from paletta_server.capabilities import common
from paletta_server.storage import AssetInfo

MULTIPLE = 16
REALESRGAN_KEY = "realesrgan-x4plus"
# A mask whose brightest pixel is at most this is "empty" (tolerates JPEG noise on black).
EMPTY_MASK_MAX = 8
UPSCALER_NAMES = {image_pb2.UPSCALER_UNSPECIFIED: "lanczos", image_pb2.UPSCALER_LANCZOS: "lanczos",
                  image_pb2.UPSCALER_REALESRGAN: "realesrgan"}


def inference_size(width: int, height: int, max_edge: int) -> tuple[int, int]:
    """The size a (width, height) input runs at: long edge ≤ max_edge, sides multiples of 16."""
    long = max(width, height)
    if long > max_edge:  # in integers: a float scale makes 511.999… of an edge of 512, then 496
        width, height = width * max_edge // long, height * max_edge // long
    return max(MULTIPLE, width // MULTIPLE * MULTIPLE), max(MULTIPLE, height // MULTIPLE * MULTIPLE)


def fit(image: Image.Image, size: tuple[int, int], resample: int = Image.Resampling.LANCZOS) -> Image.Image:
    return image if image.size == tuple(size) else image.resize(size, resample)


def check_upscaler(v: common.Violations, request: Any) -> None:
    if request.upscaler not in UPSCALER_NAMES:
        v.add("upscaler", f"unknown upscaler {request.upscaler}; use UPSCALER_LANCZOS or UPSCALER_REALESRGAN")


def upscaler_models(request: Any) -> list[str]:
    return [REALESRGAN_KEY] if request.upscaler == image_pb2.UPSCALER_REALESRGAN else []


def restore(image: Image.Image, size: tuple[int, int], request: Any, ctx: Any) -> Image.Image:
    """Bring an output back to ``size`` with the request's upscaler (engines/upscale.py)."""
    size = (int(size[0]), int(size[1]))
    if image.size == size:
        return image
    from paletta_server.engines import upscale

    model = None
    if request.upscaler == image_pb2.UPSCALER_REALESRGAN and (image.width < size[0] or image.height < size[1]):
        model = ctx.model(REALESRGAN_KEY)

    def on_tile(done: int, total: int) -> None:
        ctx.check_cancelled()
        ctx.progress(done, total, "upscaling")

    return upscale.restore_size(image, size, request.upscaler, model, on_tile=on_tile)


def round_trip_parameters(request: Any, input_size: tuple[int, int], infer: tuple[int, int],
                          output_size: tuple[int, int]) -> dict:
    return {"input_size": list(input_size), "inference_size": list(infer), "output_size": list(output_size),
            "upscaler": UPSCALER_NAMES.get(request.upscaler, "lanczos") if infer != tuple(output_size) else "none"}


# -- masks ----------------------------------------------------------------------------------------
def mask_from(image: Image.Image) -> Image.Image:
    """An "L" mask from an uploaded image: alpha if the image has any transparency, else luminance."""
    if image.mode in ("RGBA", "LA"):
        alpha = image.getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
    return image.convert("L")


def may_be_transparent(path: Path) -> bool:
    """Whether a stored image can hold transparent pixels (an alpha channel or a tRNS key), from
    its header: no pixel is decoded."""
    with Image.open(path) as image:
        return "A" in image.mode or "transparency" in image.info


def transparent_region(image: Image.Image) -> Image.Image | None:
    """The mask of an image's transparent pixels (white = transparent), or None if it has none: an
    inpaint without a mask repaints them (a background-removal cut-out gets a new backdrop)."""
    if "A" not in image.mode and "transparency" not in image.info:
        return None
    region = ImageOps.invert(image.convert("RGBA").getchannel("A"))
    return None if is_empty(region) else region


def is_empty(mask: Image.Image) -> bool:
    return mask.getextrema()[1] <= EMPTY_MASK_MAX


def feathered(mask: Image.Image, radius: int, keep_inside: bool = False) -> Image.Image:
    """Gaussian-blurred mask edge; ``keep_inside`` keeps every originally white pixel fully white."""
    if radius <= 0:
        return mask
    blurred = mask.filter(ImageFilter.GaussianBlur(radius))
    if keep_inside:
        from PIL import ImageChops

        blurred = ImageChops.lighter(blurred, mask)
    return blurred


# -- inputs ---------------------------------------------------------------------------------------
def input_image(v: common.Violations, ctx: Any, ref: image_pb2.ImageRef, field_name: str) -> AssetInfo | None:
    """Resolve a required ImageRef (inline bytes become an asset); its stored size, or None with a violation.

    Reads the asset's metadata, not its pixels: the store checked them when the image came in, and
    the job decodes it once, on the device.
    """
    from paletta_server.errors import InvalidArgument

    if ref.WhichOneof("source") is None:
        v.add(field_name, "an image is required (asset name or inline bytes)")
        return None
    try:
        common.resolve_image(ctx, ref, field_name)
    except InvalidArgument as exc:
        v.items.extend(exc.violations)
        return None
    return ctx.assets.get(ref.asset, f"{field_name}.asset")


def check_common(v: common.Violations, request: Any, default_steps: int, default_guidance: float,
                 guidance_range: tuple[float, float]) -> None:
    """steps / variants / guidance / upscaler, shared by every diffusion request."""
    common.default_steps(v, request, default_steps)
    common.default_variants(v, request)
    common.default_range(v, request, "guidance", default_guidance, *guidance_range)
    check_upscaler(v, request)
