"""Tiny FLUX.1-schnell: the real diffusers components and folder layout, random weights, ~1 MB.

Shapes follow shared/notes/offline-models.md: an 8x-downscaling 16-channel VAE, a one-layer
FluxTransformer2DModel, CLIP and T5 text encoders of width 32 with character tokenizers.
The other FLUX-family builders reuse ``tiny_components``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SEED = 0


def clip_tokenizer() -> Any:
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in ByteLevel.alphabet():
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> Any:
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(32, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(8)]
    return T5Tokenizer(vocab=vocab, extra_ids=8)


def tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
    )


def tiny_transformer(in_channels: int = 64, out_channels: int | None = None, guidance_embeds: bool = False) -> Any:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=out_channels, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    )


def tiny_text_encoders() -> dict[str, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, vocab_size=1000, projection_dim=32,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    t5 = T5EncoderModel(T5Config(
        d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=2, vocab_size=256,
        relative_attention_num_buckets=8,
    ))
    return {"text_encoder": clip, "tokenizer": clip_tokenizer(), "text_encoder_2": t5, "tokenizer_2": t5_tokenizer()}


def tiny_components(in_channels: int = 64, out_channels: int | None = None, guidance_embeds: bool = False,
                    shift: float = 1.0) -> dict[str, Any]:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(SEED)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=shift),
        "vae": tiny_vae(),
        "transformer": tiny_transformer(in_channels, out_channels, guidance_embeds),
        **tiny_text_encoders(),
    }


def build_schnell(folder: Path) -> None:
    from diffusers import FluxPipeline

    FluxPipeline(**tiny_components()).save_pretrained(folder)
