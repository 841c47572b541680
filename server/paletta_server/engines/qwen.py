"""Qwen-Image-Edit through diffusers' ``QwenImageEditPipeline``: load, previews, edit.

The pipeline resizes its conditioning image to ~1 MP (``calculate_dimensions(1024 * 1024, …)``
inside ``__call__``) whatever the requested size. Paletta's round trip already picked the
inference size for the profile, so ``edit`` caps that area at the inference image's own area
(never above 1 MP): under ``fast`` a 1024×768 input is conditioned at 1024×768, and a 64×64 test
image costs 64×64 instead of 2.3 s of 1 MP work on a CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from paletta_server.engines import flux
from paletta_server.engines.common import PendingPreview, ProgressSink, linear_preview, step_callback
from paletta_server.models.types import LoadContext, ModelSource

FULL_AREA = 1024 * 1024
_patch_lock = threading.Lock()


def load_qwen_edit(source: ModelSource, lc: LoadContext) -> Any:
    """QwenImageEditPipeline; under NF4 (CUDA) the 20B transformer and the Qwen2.5-VL encoder are 4-bit.

    At full size that is ≈ 18 GB: on a 16 GB card the memory plan loads it under model CPU offload
    (``lc.offload``), the text encoder leaving the GPU once the prompt is encoded."""
    from diffusers import QwenImageEditPipeline

    return flux.load_pipeline(QwenImageEditPipeline, source, lc, quantize=["transformer", "text_encoder"])


class QwenLatentPreview:
    """Latent → RGB by a linear map fitted once against the pipeline's own (video-shaped) VAE."""

    def __init__(self, pipe: Any):
        import torch

        vae = pipe.vae
        channels = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, channels, 1, 1, 1)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            latents = torch.randn(1, channels, 1, 8, 8, generator=gen)
            device = getattr(pipe, "_execution_device", vae.device)  # under offload the hook moves the VAE
            decoded = vae.decode((latents * std + mean).to(device, vae.dtype), return_dict=False)[0]
            rgb = torch.nn.functional.adaptive_avg_pool2d(decoded[:, :, 0].float().cpu(), (8, 8))
        x = latents.reshape(channels, -1).T
        x1 = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
        self.weights = torch.linalg.lstsq(x1, rgb.reshape(3, -1).T).solution.to(device)
        self.scale = pipe.vae_scale_factor
        self.unpack = type(pipe)._unpack_latents

    def start(self, latents: Any, height: int, width: int) -> PendingPreview:
        return linear_preview(self.unpack(latents, height, width, self.scale)[0, :, 0], self.weights)  # (C, h, w)


@contextmanager
def conditioning_area(area: int) -> Iterator[None]:
    """Cap the area the pipeline resizes its conditioning image to (module function, one job at a time)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module

    original = module.calculate_dimensions
    with _patch_lock:
        module.calculate_dimensions = lambda target, ratio: original(min(target, area), ratio)
        try:
            yield
        finally:
            module.calculate_dimensions = original


def edit(pipe: Any, sink: ProgressSink, *, image: Any, prompt: str, negative_prompt: str, steps: int, seed: int,
         guidance: float, preview_every: int = 2) -> Any:
    width, height = image.size
    preview = getattr(pipe, "_paletta_preview", None)
    if preview is None:
        preview = pipe._paletta_preview = QwenLatentPreview(pipe)

    sink.check_cancelled()
    # True CFG needs a negative prompt; " " is the model card's neutral one.
    negative = negative_prompt if negative_prompt.strip() else " "
    with conditioning_area(min(FULL_AREA, width * height)):
        result = pipe(
            image=image, prompt=prompt, negative_prompt=negative if guidance > 1 else None,
            true_cfg_scale=guidance, height=height, width=width, num_inference_steps=steps,
            generator=flux.generator(flux.execution_device(pipe), seed),
            callback_on_step_end=step_callback(sink, steps, lambda latents: preview.start(latents, height, width),
                                                preview_every),
            callback_on_step_end_tensor_inputs=["latents"],
        )
    return result.images[0]
