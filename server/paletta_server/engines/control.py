"""ControlNet Union-Pro (Shakker-Labs) on FLUX.1-dev through ``FluxControlNetPipeline``.

The registry key ``flux-controlnet-union`` loads the whole pipeline: the ControlNet from its own
source and the FLUX.1-dev base from ``lc.source_of("flux-dev")``. ``flux-dev`` itself is only a
source (``load_dev_source``); it is never resident on its own, so the residency manager sees one
~14 GB model and makes room for it like for any other (no ad-hoc release calls).

Union-Pro picks the kind of conditioning with ``control_mode``: canny 0, tile 1, depth 2, blur 3,
pose 4, gray 5, low quality 6. Paletta exposes canny, depth and pose. ``canny_map`` makes an edge
map from a plain photo with OpenCV for ``preprocess = CANNY``.
"""

from __future__ import annotations

from typing import Any

from paletta.v1 import control_pb2 as pb
from paletta_server.engines import flux
from paletta_server.engines.common import ProgressSink, pretrained_location
from paletta_server.models.types import LoadContext, ModelSource

CONTROL_MODES: dict[int, int] = {pb.CONTROL_TYPE_CANNY: 0, pb.CONTROL_TYPE_DEPTH: 2, pb.CONTROL_TYPE_POSE: 4}
CONTROL_NAMES: dict[int, str] = {pb.CONTROL_TYPE_CANNY: "canny", pb.CONTROL_TYPE_DEPTH: "depth",
                                 pb.CONTROL_TYPE_POSE: "pose"}
CANNY_LOW = 100
CANNY_HIGH = 200


def load_dev_source(source: ModelSource, lc: LoadContext) -> ModelSource:
    """``flux-dev`` is the base under the ControlNet: loading it alone just names where it is."""
    return source


def load_control(source: ModelSource, lc: LoadContext) -> Any:
    """FluxControlNetPipeline = FLUX.1-dev + the Union-Pro ControlNet, both NF4 on CUDA under fast/hyper
    (float8 under turbo).

    In bf16 the ControlNet (3.3 B parameters) alone is 6.6 GB: 17.1 GB resident with the NF4 base,
    more than a 16 GB card; in NF4 it is ≈ 1.9 GB (≈ 12.4 GB with the base)."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    where, kwargs = pretrained_location(source)
    if (quantization := flux.component_quantization(lc)) is not None:
        kwargs["quantization_config"] = quantization
    controlnet = FluxControlNetModel.from_pretrained(where, dtype=lc.device.dtype, **kwargs)
    return flux.load_pipeline(FluxControlNetPipeline, lc.source_of("flux-dev"), lc, controlnet=controlnet)


def canny_map(image: Any, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Any:
    """White edges on black, as RGB (the conditioning Union-Pro's canny mode was trained on)."""
    import cv2
    import numpy as np
    from PIL import Image

    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, low, high)
    return Image.fromarray(edges, "L").convert("RGB")


def control(pipe: Any, sink: ProgressSink, *, control_image: Any, control_type: int, control_scale: float,
            prompt: str, width: int, height: int, steps: int, seed: int, guidance: float,
            preview_every: int = 2, **extra: Any) -> Any:
    return flux.run_pipeline(
        pipe, sink, steps=steps, height=height, width=width, preview_every=preview_every, prompt=prompt,
        control_image=control_image, control_mode=CONTROL_MODES[control_type],
        controlnet_conditioning_scale=control_scale, guidance_scale=guidance,
        generator=flux.generator(flux.execution_device(pipe), seed), **extra,
    )
