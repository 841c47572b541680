"""FLUX.1-Kontext-dev instruction edits and FLUX.1-Fill-dev inpainting/outpainting.

Both build on ``engines.flux``: the same loading (NF4 on CUDA under ``fast``/``hyper``), the same
step callback (progress, previews, cancellation). Images arrive already at their inference size
(a multiple of 16, see ``capabilities/diffusion_io.py``); these functions never resize.
"""

from __future__ import annotations

from typing import Any

from paletta_server.engines import flux
from paletta_server.engines.common import ProgressSink
from paletta_server.models.types import LoadContext, ModelSource


def load_kontext(source: ModelSource, lc: LoadContext) -> Any:
    from diffusers import FluxKontextPipeline

    return flux.load_pipeline(FluxKontextPipeline, source, lc)


def load_fill(source: ModelSource, lc: LoadContext) -> Any:
    from diffusers import FluxFillPipeline

    return flux.load_pipeline(FluxFillPipeline, source, lc)


def edit(pipe: Any, sink: ProgressSink, *, image: Any, prompt: str, steps: int, seed: int, guidance: float,
         preview_every: int = 2, **extra: Any) -> Any:
    """Kontext edit at the image's own size.

    ``max_area`` = the image's area and ``_auto_resize=False`` keep Kontext from snapping to its
    ~1 MP training buckets: the round trip already chose the inference size for the profile.
    """
    width, height = image.size
    return flux.run_pipeline(
        pipe, sink, steps=steps, height=height, width=width, preview_every=preview_every, image=image,
        prompt=prompt, guidance_scale=guidance, generator=flux.generator(flux.execution_device(pipe), seed),
        max_area=width * height, _auto_resize=False, **extra,
    )


def fill(pipe: Any, sink: ProgressSink, *, image: Any, mask: Any, prompt: str, steps: int, seed: int,
         guidance: float, preview_every: int = 2) -> Any:
    """Fill the white part of ``mask`` (an "L" image, same size as ``image``)."""
    width, height = image.size
    return flux.run_pipeline(
        pipe, sink, steps=steps, height=height, width=width, preview_every=preview_every, image=image,
        mask_image=mask, prompt=prompt, guidance_scale=guidance,
        generator=flux.generator(flux.execution_device(pipe), seed),
    )
