"""FLUX.1 pipelines through diffusers: loading (NF4 / bf16 / fp32), text-to-image, step
callbacks, and cheap latent previews. The edit, fill and control engines build on these."""

from __future__ import annotations

from typing import Any

from paletta_server.engines import nf4_cache, turbo
from paletta_server.engines.common import (
    PendingPreview,
    ProgressSink,
    linear_preview,
    pretrained_location,
    step_callback,
)
from paletta_server.models.types import LoadContext, ModelSource

NF4_COMPONENTS = ["transformer", "text_encoder_2"]
# Under float8 only the diffusion transformer is quantized (the text encoders run once per prompt).
FLOAT8_COMPONENTS = ("transformer",)


def pretrained_kwargs(source: ModelSource, lc: LoadContext, quantize: list[str] | None = None) -> dict[str, Any]:
    """from_pretrained arguments for a registry source: local folder or repo@revision, dtype, NF4 / float8."""
    kwargs: dict[str, Any] = {"dtype": lc.device.dtype, **pretrained_location(source)[1]}
    components = NF4_COMPONENTS if quantize is None else quantize
    if lc.device.name != "cuda" or not components:
        return kwargs
    from diffusers.quantizers import PipelineQuantizationConfig

    if lc.device.quantization == "nf4":
        kwargs["quantization_config"] = PipelineQuantizationConfig(
            quant_backend="bitsandbytes_4bit", quant_kwargs=_nf4_settings(), components_to_quantize=components)
    elif lc.device.quantization == "float8" and (float8 := [c for c in components if c in FLOAT8_COMPONENTS]):
        kwargs["quantization_config"] = PipelineQuantizationConfig(
            quant_mapping={name: component_quantization(lc) for name in float8})
    return kwargs


def float8_settings() -> Any:
    """torchao's float8 weights with per-row scales and float8 activations scaled per row at run time:
    the recipe of huggingface/flux-fast (Ada / Hopper tensor cores)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def component_quantization(lc: LoadContext) -> Any | None:
    """Quantization of a diffusers model loaded on its own (the ControlNet) under this device's setting."""
    if lc.device.name != "cuda":
        return None
    if lc.device.quantization == "nf4":
        return _nf4_config("diffusers")
    if lc.device.quantization == "float8":
        from diffusers import TorchAoConfig

        return TorchAoConfig(float8_settings())
    return None


def load_pipeline(cls: Any, source: ModelSource, lc: LoadContext, quantize: list[str] | None = None,
                  compile: bool = True, **extra: Any) -> Any:
    """Load a diffusers pipeline class from a source and move it to the device; when the memory plan
    says so (``lc.offload``), keep it on the CPU under model CPU offload instead. Under a compiling
    profile (turbo) the transformer's repeated blocks are compiled unless ``compile`` is False."""
    if lc.offload and lc.device.name == "cuda":
        pipe = _load_on_cpu(cls, source, lc, quantize, **extra)
    else:
        pipe = from_pretrained(cls, source, lc, quantize, **extra)
        pipe.to(lc.device.name)
    pipe.set_progress_bar_config(disable=True)
    if lc.offload:
        offload_model_cpu(pipe, lc.device)
    elif compile and getattr(lc.profile, "compile", False):
        turbo.compile_blocks(pipe, lc)
    return pipe


def offload_model_cpu(pipe: Any, device: Any) -> None:
    """diffusers' model CPU offload: components wait on the CPU and move to the GPU one at a time as the
    pipeline calls them (text encoders leave once the prompt is encoded). On a CPU device the weights
    are in host memory already, so only the mark is set."""
    if getattr(device, "name", "cpu") == "cuda" and hasattr(pipe, "enable_model_cpu_offload"):
        pipe.enable_model_cpu_offload(device="cuda")
    pipe._paletta_offloaded = True


def _component_class(source: ModelSource, component: str) -> Any:
    import importlib

    from diffusers import DiffusionPipeline

    where, kwargs = pretrained_location(source)
    library, class_name = DiffusionPipeline.load_config(where, **kwargs)[component]
    return getattr(importlib.import_module(library), class_name)


def _nf4_settings() -> dict[str, Any]:
    import torch

    return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16}


def _nf4_config(library_module: str) -> Any:
    if library_module.startswith("transformers"):
        from transformers import BitsAndBytesConfig
    else:
        from diffusers import BitsAndBytesConfig
    return BitsAndBytesConfig(**_nf4_settings())


def _load_on_cpu(cls: Any, source: ModelSource, lc: LoadContext, quantize: list[str] | None, **extra: Any) -> Any:
    """The pipeline on the CPU, for model CPU offload. NF4 components are quantized (or read from the
    NF4 cache, which bitsandbytes also places on the GPU) one at a time and each moved to the CPU at
    once, so loading never holds more than one on the device; other settings (float8, bf16) load on
    the CPU as a whole."""
    from paletta_server.engines.common import free_device_memory

    for value in extra.values():
        if hasattr(value, "parameters") and hasattr(value, "to"):
            value.to("cpu")
    if lc.device.quantization != "nf4":
        return from_pretrained(cls, source, lc, quantize, **extra)
    components = NF4_COMPONENTS if quantize is None else quantize
    loaded: dict[str, Any] = {}
    todo: list[str] = []
    cache = nf4_cache.cache_dir(lc)
    where, kwargs = pretrained_location(source)
    for name in components:
        model = nf4_cache.load(cache, source, [name], lc).get(name) if cache else None
        if model is None:
            todo.append(name)
            model_cls = _component_class(source, name)
            model = model_cls.from_pretrained(where, subfolder=name, dtype=lc.device.dtype,
                                              quantization_config=_nf4_config(model_cls.__module__), **kwargs)
        loaded[name] = model.to("cpu")
        free_device_memory()
    pipe = cls.from_pretrained(where, dtype=lc.device.dtype, **kwargs, **loaded, **extra)
    if cache and todo:
        nf4_cache.store(cache, source, todo, pipe)
    return pipe


def execution_device(pipe: Any) -> str:
    """"cuda" or "cpu": where the pipeline computes (under CPU offload its modules wait on the CPU)."""
    return str(getattr(pipe, "_execution_device", pipe.device).type)


def from_pretrained(cls: Any, source: ModelSource, lc: LoadContext, quantize: list[str] | None = None,
                    **extra: Any) -> Any:
    """``cls.from_pretrained``, NF4 components taken from or else added to the cache (engines/nf4_cache.py)."""
    components = NF4_COMPONENTS if quantize is None else quantize
    cache = nf4_cache.cache_dir(lc)
    cached = nf4_cache.load(cache, source, components, lc) if cache else {}
    todo = [c for c in components if c not in cached]
    pipe = cls.from_pretrained(pretrained_location(source)[0], **pretrained_kwargs(source, lc, todo), **cached, **extra)
    if cache and todo:
        nf4_cache.store(cache, source, todo, pipe)
    return pipe


def load_flux(source: ModelSource, lc: LoadContext) -> Any:
    from diffusers import FluxPipeline

    return load_pipeline(FluxPipeline, source, lc)


def generator(device: str, seed: int) -> Any:
    import torch

    return torch.Generator(device="cpu" if device != "cuda" else "cuda").manual_seed(seed)


class LatentPreview:
    """Latent → RGB by a 16→3 linear map fitted once against the pipeline's own VAE.

    Decoding a tiny random latent and regressing its colours on the latent channels gives a
    map that works for any FLUX-family VAE without a hand-copied table; a preview then costs
    a matrix product on the device instead of a VAE decode (see common.linear_preview).
    """

    def __init__(self, pipe: Any):
        import torch

        vae = pipe.vae
        channels = vae.config.latent_channels
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            device = getattr(pipe, "_execution_device", vae.device)  # under offload the hook moves the VAE
            latents = torch.randn(1, channels, 8, 8, generator=gen).to(device, vae.dtype)
            image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
            rgb = torch.nn.functional.adaptive_avg_pool2d(image.float(), (8, 8))
        x = latents.float().reshape(channels, -1).T.cpu()  # (64, C)
        y = rgb.reshape(3, -1).T.cpu()  # (64, 3)
        x1 = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
        self.weights = torch.linalg.lstsq(x1, y).solution.to(device)  # (C + 1, 3), where the latents will be
        self.scale = pipe.vae_scale_factor
        self.unpack = getattr(type(pipe), "_unpack_latents", None)

    def start(self, latents: Any, height: int, width: int) -> PendingPreview:
        if latents.dim() == 3 and self.unpack is not None:  # FLUX packs 2x2 patches into tokens
            latents = self.unpack(latents, height, width, self.scale)
        return linear_preview(latents[0], self.weights)


def preview_for(pipe: Any) -> LatentPreview:
    cached = getattr(pipe, "_paletta_preview", None)
    if cached is None:
        cached = LatentPreview(pipe)
        pipe._paletta_preview = cached
    return cached


def run_pipeline(pipe: Any, sink: ProgressSink, *, steps: int, height: int, width: int,
                 preview_every: int = 2, **kwargs: Any) -> Any:
    """Call a FLUX-family pipeline with progress, previews and cancellation; returns a PIL image."""
    preview = preview_for(pipe)
    sink.check_cancelled()
    callback = step_callback(sink, steps, lambda latents: preview.start(latents, height, width), preview_every)
    result = pipe(num_inference_steps=steps, height=height, width=width, callback_on_step_end=callback,
                  callback_on_step_end_tensor_inputs=["latents"], **kwargs)
    return result.images[0]


def text_to_image(pipe: Any, sink: ProgressSink, *, prompt: str, width: int, height: int, steps: int, seed: int,
                  guidance: float, preview_every: int = 2, **extra: Any) -> Any:
    return run_pipeline(
        pipe, sink, steps=steps, height=height, width=width, preview_every=preview_every, prompt=prompt,
        guidance_scale=guidance, generator=generator(execution_device(pipe), seed), **extra,
    )
