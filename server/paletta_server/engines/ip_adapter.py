"""IP-Adapter (image as prompt) for FLUX pipelines through diffusers' ``load_ip_adapter``.

Two registry residents: ``ip-adapter`` (the adapter weights, read once from safetensors into the
state-dict layout diffusers expects) and ``clip-vit-large`` (the CLIPVisionModelWithProjection
image encoder). For a job with an ``image_prompt`` the adapter is put into the job's pipeline,
``set_ip_adapter_scale(weight)`` is applied, the pipeline gets ``ip_adapter_image=...``, and at
the job's end ``unload_ip_adapter()`` restores the pipeline's own attention processors, so the
next job runs exactly the base model. Weight 0 gives the same pixels as no image prompt (the
adapter adds ``0 × attention`` to the image stream).

Which checkpoints work
----------------------
**Supported: the XLabs FLUX IP-Adapter format** (``XLabs-AI/flux-ip-adapter``,
``ip_adapter.safetensors``; ``XLabs-AI/flux-ip-adapter-v2`` has the same layout) with the
``openai/clip-vit-large-patch14`` image encoder. Keys: ``ip_adapter_proj_model.{proj,norm}.*`` (a
linear projection of the CLIP image embedding to 4 or 16 tokens) and
``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*`` (extra key/value projections
in each of the 19 double-stream blocks). This is the only FLUX layout diffusers 0.42 reads.

**Not supported: InstantX/FLUX.1-dev-IP-Adapter** (the seed's choice), because its architecture,
not only its file names, differs from what diffusers implements:

- image encoder: ``google/siglip-so400m-patch14-384`` (a SigLIP vision model, 1152-d patch
  features), not CLIP ViT-L/14 image embeddings;
- projection: an ``MLPProjModel`` producing 128 image tokens from those features, where diffusers'
  Flux loader only builds ``ImageProjection`` from a single ``proj.weight`` (4 or 16 tokens);
- attention: adapter key/value layers in all 57 blocks, including the 38 single-stream blocks,
  whereas diffusers' ``FluxIPAdapterAttnProcessor`` exists for double-stream blocks only and the
  loader gives single-stream blocks their plain processors;
- file: ``ip-adapter.bin``, a pickle, which Paletta refuses (weights load from safetensors only).

Running it needs InstantX's own ``pipeline_flux_ipa.py`` / attention processors (a forked
transformer). ``load_ip_adapter`` below recognises that layout and fails with a message that says
so instead of a shape error; point the ``ip-adapter`` model at an XLabs checkpoint instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paletta_server.engines.common import pretrained_location
from paletta_server.errors import ModelUnavailable
from paletta_server.models.types import LoadContext, ModelSource

DEFAULT_WEIGHT = 0.7
WEIGHT_FILE = "ip_adapter.safetensors"
INSTANTX_HINT = (
    "this looks like the InstantX FLUX IP-Adapter (SigLIP encoder, 128-token MLP projection, single-block "
    "adapters), which diffusers 0.42 cannot run; use an XLabs-format checkpoint such as "
    "XLabs-AI/flux-ip-adapter (ip_adapter.safetensors) with openai/clip-vit-large-patch14"
)


@dataclass
class IPAdapterWeights:
    """An IP-Adapter in diffusers' state-dict layout: {"image_proj": {...}, "ip_adapter": {...}}."""

    state_dict: dict
    source: str
    resident_bytes: int = 0


def _weights_file(source: ModelSource) -> Path:
    if source.local:
        path = Path(source.path)
        if path.is_dir():
            candidates = [path / (source.filename or WEIGHT_FILE)] + sorted(path.glob("*.safetensors"))
            found = next((p for p in candidates if p.exists()), None)
            if found is None:
                bins = sorted(path.glob("*.bin"))
                hint = f"; {INSTANTX_HINT}" if any(b.name == "ip-adapter.bin" for b in bins) else ""
                raise ModelUnavailable(f"{source.key}: no .safetensors IP-Adapter in {path}{hint}",
                                       metadata={"model": source.key})
            path = found
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source.repo, source.filename or WEIGHT_FILE, revision=source.revision or None))
    if path.suffix != ".safetensors":
        hint = f"; {INSTANTX_HINT}" if path.name == "ip-adapter.bin" else ""
        raise ModelUnavailable(f"{source.key}: {path.name} is not safetensors; only safetensors weights load{hint}",
                               metadata={"model": source.key})
    return path


def xlabs_to_diffusers(tensors: dict) -> dict:
    """XLabs key names → the {"image_proj", "ip_adapter"} dict FluxIPAdapterMixin.load_ip_adapter takes.

    The same renaming diffusers applies when it reads the file itself; done here once so the
    resident copy can be put into any pipeline without touching the disk again.
    """
    image_proj: dict = {}
    ip_adapter: dict = {}
    for key, value in tensors.items():
        if key.startswith(("ip_adapter_proj_model.", "image_proj.")):
            image_proj[".".join(key.split(".")[1:])] = value
        elif key.startswith(("double_blocks.", "ip_adapter.")):
            name = (".".join(key.split(".")[1:]).replace("ip_adapter_double_stream_k_proj", "to_k_ip")
                    .replace("ip_adapter_double_stream_v_proj", "to_v_ip").replace("processor.", ""))
            ip_adapter[name] = value
    if "proj.weight" not in image_proj or not ip_adapter:
        raise ValueError(f"not an XLabs FLUX IP-Adapter (keys {sorted(tensors)[:4]}...); {INSTANTX_HINT}")
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def load_ip_adapter(source: ModelSource, lc: LoadContext) -> IPAdapterWeights:
    """Registry loader for ``ip-adapter``: the adapter's tensors, converted, on the device."""
    from safetensors.torch import load_file

    path = _weights_file(source)
    tensors = load_file(str(path), device="cpu")
    converted = xlabs_to_diffusers(tensors)
    dtype = lc.device.dtype
    size = 0
    for part in converted.values():
        for key, value in part.items():
            part[key] = value.to(device=lc.device.name, dtype=dtype)
            size += part[key].numel() * part[key].element_size()
    return IPAdapterWeights(converted, str(path), size)


def load_image_encoder(source: ModelSource, lc: LoadContext) -> Any:
    """Registry loader for ``clip-vit-large``: CLIPVisionModelWithProjection (image embeddings)."""
    from transformers import CLIPVisionModelWithProjection

    where, kwargs = pretrained_location(source)
    encoder = CLIPVisionModelWithProjection.from_pretrained(where, dtype=lc.device.dtype, **kwargs)
    return encoder.to(lc.device.name).eval()


def _attach(pipe: Any, weights: IPAdapterWeights, encoder: Any) -> None:
    from transformers import CLIPImageProcessor

    if getattr(pipe, "image_encoder", None) is not encoder:
        pipe.register_modules(image_encoder=encoder)
    if getattr(pipe, "feature_extractor", None) is None:
        size = encoder.config.image_size
        pipe.register_modules(feature_extractor=CLIPImageProcessor(size={"shortest_edge": size},
                                                                   crop_size={"height": size, "width": size}))
    # A shallow copy: diffusers builds new layers from the tensors and never mutates the dict.
    state = {"image_proj": dict(weights.state_dict["image_proj"]), "ip_adapter": dict(weights.state_dict["ip_adapter"])}
    pipe.load_ip_adapter(state, weight_name=WEIGHT_FILE)


def detach(pipe: Any) -> None:
    """Remove the adapter: the pipeline's attention processors are the plain ones again."""
    if getattr(pipe.transformer, "encoder_hid_proj", None) is not None:
        pipe.unload_ip_adapter()


@contextmanager
def applied_image_prompt(pipe: Any, weights: Any, encoder: Any, image: Any, weight: float
                         ) -> Iterator[dict]:
    """Put the IP-Adapter (``weights`` with its CLIP ``encoder``) into ``pipe`` for one job,
    conditioned on ``image`` at ``weight``; yields the pipeline kwargs."""
    home = next(encoder.parameters()).device
    _attach(pipe, weights, encoder)
    try:
        pipe.set_ip_adapter_scale(weight)
        yield {"ip_adapter_image": image.convert("RGB")}
    finally:
        detach(pipe)
        _release(encoder, home)


def _release(encoder: Any, home: Any) -> None:
    """Give the shared CLIP encoder back as it was: under model CPU offload the pipeline's call ends by
    offloading every component it holds, the encoder included (moved to the CPU, with a hook)."""
    if hasattr(encoder, "_hf_hook"):
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(encoder, recurse=True)
    encoder.to(home)
