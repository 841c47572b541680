"""Tiny FLUX-family builds in the real formats: Kontext, Fill, dev, ControlNet Union, IP-Adapter, LoRAs.

Every builder writes what the matching loader in ``paletta_server.engines`` reads, with the same
component shapes as ``tiny/flux.py`` (so LoRAs and IP-Adapters built here fit every tiny FLUX
pipeline). Builds are seeded: the same folder is written every time.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

from paletta_server.engines.tiny.flux import tiny_components

SEED = 0
# Width of the tiny transformer's text stream (joint_attention_dim) and of its attention (inner_dim).
TEXT_DIM = 32
INNER_DIM = 32
IMAGE_EMBED_DIM = 32  # projection_dim of the tiny CLIP vision encoder
IP_TOKENS = 4  # XLabs' projection makes 4 image tokens
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_kontext(folder: Path) -> None:
    from diffusers import FluxKontextPipeline

    FluxKontextPipeline(**tiny_components(guidance_embeds=True)).save_pretrained(folder)


def build_fill(folder: Path) -> None:
    from diffusers import FluxFillPipeline

    # Fill's transformer sees noise (64) + masked image latents (64) + the 8x8-packed mask (256).
    FluxFillPipeline(**tiny_components(in_channels=384, out_channels=64, guidance_embeds=True)).save_pretrained(folder)


def build_dev(folder: Path) -> None:
    from diffusers import FluxPipeline

    FluxPipeline(**tiny_components(guidance_embeds=True)).save_pretrained(folder)


def tiny_controlnet() -> Any:
    """A Union-style FluxControlNetModel (num_mode=10) whose output layers are not zero."""
    import torch
    from diffusers import FluxControlNetModel

    torch.manual_seed(SEED + 1)
    net = FluxControlNetModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8), num_mode=10,
    )
    # A fresh ControlNet is zero-initialised at its outputs, so it would change nothing: give the
    # output projections and the conditioning embedder random weights so mode and scale matter.
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                param.copy_(torch.randn_like(param) * 0.5)
    return net


def build_control(folder: Path) -> None:
    tiny_controlnet().save_pretrained(folder)


def xlabs_ip_adapter_state_dict(num_double_blocks: int = 1, seed: int = SEED) -> dict:
    """A random IP-Adapter in XLabs' file layout (what diffusers' FluxIPAdapterMixin reads)."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.3) -> Any:
        return (torch.randn(*shape, generator=g) * scale).contiguous()

    sd = {
        "ip_adapter_proj_model.proj.weight": rand(IP_TOKENS * TEXT_DIM, IMAGE_EMBED_DIM),
        "ip_adapter_proj_model.proj.bias": rand(IP_TOKENS * TEXT_DIM),
        "ip_adapter_proj_model.norm.weight": torch.ones(TEXT_DIM),
        "ip_adapter_proj_model.norm.bias": torch.zeros(TEXT_DIM),
    }
    for i in range(num_double_blocks):
        prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream"
        for kv in ("k", "v"):
            sd[f"{prefix}_{kv}_proj.weight"] = rand(INNER_DIM, TEXT_DIM, scale=1.0)
            sd[f"{prefix}_{kv}_proj.bias"] = rand(INNER_DIM, scale=1.0)
    return sd


def build_ip_adapter(folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(xlabs_ip_adapter_state_dict(), str(folder / "ip_adapter.safetensors"))


def build_image_encoder(folder: Path) -> None:
    """A tiny CLIPVisionModelWithProjection plus its image processor (openai/clip-vit-large-patch14 layout)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(SEED)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=IMAGE_EMBED_DIM,
    ))
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def lora_state_dict(seed: int, rank: int = 4, scale: float = 0.5) -> dict:
    """A random PEFT LoRA for the tiny FLUX transformer, with diffusers' "transformer." key prefix."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from paletta_server.engines.tiny.flux import tiny_transformer

    torch.manual_seed(seed)
    transformer = tiny_transformer()
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS,
                                       init_lora_weights=False))
    layers = get_peft_model_state_dict(transformer)
    return {f"transformer.{k}": (v * scale).contiguous() for k, v in layers.items()}


def write_lora(path: Path, seed: int) -> None:
    """Write a tiny LoRA safetensors file atomically (readers may race a first build)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{seed}")
    save_file(lora_state_dict(seed), str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def name_seed(name: str) -> int:
    return zlib.crc32(name.encode()) % (2**31)


def build_style(path: Path, name: str) -> None:
    """A style's tiny LoRA: random weights seeded by the style's name (models/styles.py calls it)."""
    write_lora(path, name_seed(name))


def build_lora(folder: Path, weight_name: str = "Hyper-FLUX.1-dev-8steps-lora.safetensors") -> None:
    """The registry's hyper-sd key (a LoRA file in a folder); style LoRAs use ``build_style``."""
    write_lora(Path(folder) / weight_name, name_seed(weight_name))
