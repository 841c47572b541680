"""PuLID-FLUX v0.9.1 (guozinan/PuLID) on diffusers' FluxPipeline for FLUX.1-dev.

The architecture, as in PuLID's ``pulid/encoders_transformer.py`` and ``flux/model.py``:

- identity features: the ArcFace embedding (512, InsightFace antelopev2) of the chosen face, and
  EVA02-CLIP-L-14-336 on the aligned face with its non-face parts whitened (engines/faces.py):
  its normalised projected embedding (768) and the hidden states entering blocks 4, 8, 12, 16
  and 20 (five scales, 1024 wide);
- :class:`IDFormer`: ``id_embedding_mapping`` turns ArcFace + EVA (1280) into 5 tokens; 32
  learned queries (concatenated with them) attend to each scale's mapped ViT features through
  two PerceiverAttention + FeedForward layers per scale; ``proj_out`` gives 32 identity tokens
  of width 2048;
- :class:`PerceiverAttentionCA` modules (20 for FLUX.1-dev): one after every second double-stream
  block and every fourth single-stream block, each adding ``id_strength * ca(id_tokens, img)``
  to the image tokens, from ``start_step`` on.

The weights file ``pulid_flux_v0.9.1.safetensors`` holds ``pulid_encoder.*`` (the IDFormer) and
``pulid_ca.{i}.*`` (the CA modules, double-stream ones first); :class:`PulidModules` has exactly
those names, so it loads strictly. Dimensions are read from the tensors' shapes (head widths
are PuLID's: 64 in the IDFormer, 128 in the CA), which is what lets the tiny profile load a
tiny file through the same code.

Injection without forking diffusers: diffusers 0.42's ``FluxTransformerBlock`` and
``FluxSingleTransformerBlock`` both return ``(encoder_hidden_states, hidden_states)``, so a
forward hook on ``transformer_blocks[::2]`` and ``single_transformer_blocks[::4]`` replaces the
image tokens with ``img + id_strength * ca_k(id, img)``. A pre-hook on the transformer counts its
calls to know the step (and, under true CFG, whether the call is the negative one, which gets
PuLID's neutral "uncond" identity). The hooks live for one image (:func:`injected_identity`)
and are removed in ``finally``: the resident pipeline is left exactly as loaded, so a later
job on it gives the same bits as if identity had never run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paletta_server.engines import flux
from paletta_server.engines.common import ProgressSink
from paletta_server.errors import ModelUnavailable
from paletta_server.models.types import LoadContext, ModelSource

WEIGHTS_FILE = "pulid_flux_v0.9.1.safetensors"
DOUBLE_INTERVAL = 2
SINGLE_INTERVAL = 4
IDFORMER_DIM_HEAD = 64
CA_DIM_HEAD = 128
ARCFACE_DIM = 512
EVA_HIDDEN_BLOCKS = (4, 8, 12, 16, 20)
EVA_ARCHITECTURE = "eva02_large_patch14_clip_336"
EVA_FILES = ("open_clip_model.safetensors", "model.safetensors")
# OpenAI CLIP normalisation, which EVA02-CLIP uses (PuLID's eva_transform_mean / std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_NEGATIVE_PROMPT = "bad quality, worst quality, text, signature, watermark, extra limbs"


# -- the PuLID modules ----------------------------------------------------------------------------
def feed_forward(dim: int, mult: float) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, _ = x.shape
    return x.view(batch, length, heads, -1).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dim_head: int) -> torch.Tensor:
    # Both sides scaled by dim_head^-1/4 (PuLID: more stable in half precision); softmax in fp32.
    scale = 1 / math.sqrt(math.sqrt(dim_head))
    weight = (q * scale) @ (k * scale).transpose(-2, -1)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    out = weight @ v
    return out.permute(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], -1)


class PerceiverAttention(nn.Module):
    """IDFormer layer: latents attend to [context, latents]."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        out = _attend(_heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads), self.dim_head)
        return self.to_out(out)


class PerceiverAttentionCA(nn.Module):
    """PuLID-FLUX cross-attention: image tokens (``dim``) query the identity tokens (``kv_dim``)."""

    def __init__(self, dim: int, dim_head: int, heads: int, kv_dim: int):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(kv_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, id_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        id_tokens, image_tokens = self.norm1(id_tokens), self.norm2(image_tokens)
        q = self.to_q(image_tokens)
        k, v = self.to_kv(id_tokens).chunk(2, dim=-1)
        out = _attend(_heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads), self.dim_head)
        return self.to_out(out)


def _mapping(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, out_dim))


@dataclass(frozen=True)
class IDFormerShape:
    """IDFormer hyper-parameters; v0.9.1: dim 1024, depth 10, 16 heads of 64, 5 id tokens,
    32 queries, output 2048, ff x4, ViT width 1024, mapping width 1024, id input 1280."""

    dim: int = 1024
    depth: int = 10
    heads: int = 16
    num_id_token: int = 5
    num_queries: int = 32
    output_dim: int = 2048
    ff_mult: float = 4.0
    vit_dim: int = 1024
    mapping_dim: int = 1024
    id_in_dim: int = 1280

    @staticmethod
    def of(state: dict[str, torch.Tensor], prefix: str = "pulid_encoder.") -> IDFormerShape:
        def shape(name: str) -> tuple[int, ...]:
            return tuple(state[prefix + name].shape)

        dim = shape("latents")[2]
        depth = len({k.split(".")[2] for k in state if k.startswith(prefix + "layers.")})
        return IDFormerShape(
            dim=dim, depth=depth, heads=shape("layers.0.0.to_q.weight")[0] // IDFORMER_DIM_HEAD,
            num_id_token=shape("id_embedding_mapping.6.weight")[0] // dim, num_queries=shape("latents")[1],
            output_dim=shape("proj_out")[1], ff_mult=shape("layers.0.1.1.weight")[0] / dim,
            vit_dim=shape("mapping_0.0.weight")[1], mapping_dim=shape("mapping_0.0.weight")[0],
            id_in_dim=shape("id_embedding_mapping.0.weight")[1],
        )


class IDFormer(nn.Module):
    """Perceiver-resampler: ArcFace + EVA tokens and five ViT scales → ``num_queries`` identity tokens."""

    def __init__(self, shape: IDFormerShape):
        super().__init__()
        if shape.depth % 5:
            raise ValueError(f"IDFormer depth must be a multiple of 5 (one group per ViT scale), got {shape.depth}")
        self.shape = shape
        self.per_scale = shape.depth // 5
        dim = shape.dim
        self.latents = nn.Parameter(torch.randn(1, shape.num_queries, dim) * dim**-0.5)
        self.proj_out = nn.Parameter(torch.randn(dim, shape.output_dim) * dim**-0.5)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, IDFORMER_DIM_HEAD, shape.heads), feed_forward(dim, shape.ff_mult)])
            for _ in range(shape.depth)
        )
        for i in range(5):
            setattr(self, f"mapping_{i}", _mapping(shape.vit_dim, shape.mapping_dim, dim))
        self.id_embedding_mapping = _mapping(shape.id_in_dim, shape.mapping_dim, dim * shape.num_id_token)

    def forward(self, id_cond: torch.Tensor, vit_hidden: list[torch.Tensor]) -> torch.Tensor:
        latents = self.latents.repeat(id_cond.size(0), 1, 1)
        x = self.id_embedding_mapping(id_cond).reshape(id_cond.size(0), self.shape.num_id_token, self.shape.dim)
        latents = torch.cat((latents, x), dim=1)
        for i in range(5):
            context = torch.cat((x, getattr(self, f"mapping_{i}")(vit_hidden[i])), dim=1)
            for attn, ff in self.layers[i * self.per_scale:(i + 1) * self.per_scale]:
                latents = attn(context, latents) + latents
                latents = ff(latents) + latents
        return latents[:, :self.shape.num_queries] @ self.proj_out


class PulidModules(nn.Module):
    """What ``pulid_flux_v0.9.1.safetensors`` holds, under the same names."""

    def __init__(self, encoder_shape: IDFormerShape, ca_count: int, ca_dim: int, ca_heads: int, ca_kv_dim: int):
        super().__init__()
        self.pulid_encoder = IDFormer(encoder_shape)
        self.pulid_ca = nn.ModuleList(
            PerceiverAttentionCA(ca_dim, CA_DIM_HEAD, ca_heads, ca_kv_dim) for _ in range(ca_count))

    @staticmethod
    def from_state_dict(state: dict[str, torch.Tensor]) -> PulidModules:
        unknown = sorted({k.split(".")[0] for k in state} - {"pulid_encoder", "pulid_ca"})
        if unknown or "pulid_ca.0.to_q.weight" not in state:
            raise ValueError(f"not a PuLID-FLUX weights file (top-level modules {unknown or 'missing pulid_ca'})")
        ca_count = len({k.split(".")[1] for k in state if k.startswith("pulid_ca.")})
        q = state["pulid_ca.0.to_q.weight"]
        modules = PulidModules(IDFormerShape.of(state), ca_count, q.shape[1], q.shape[0] // CA_DIM_HEAD,
                               state["pulid_ca.0.to_kv.weight"].shape[1])
        modules.load_state_dict(state, strict=True)
        return modules.eval()


# -- loaders --------------------------------------------------------------------------------------
def _single_file(source: ModelSource, names: tuple[str, ...]) -> Path:
    """The source's safetensors file (a local file, or a name in a local folder, or from the Hub)."""
    if source.local:
        path = Path(source.path)
        if path.is_dir():
            candidates = [path / n for n in ((source.filename,) if source.filename else ()) + names]
            path = next((p for p in candidates + sorted(path.glob("*.safetensors")) if p.exists()), candidates[0])
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source.repo, source.filename or names[0], revision=source.revision or None))
    if path.suffix != ".safetensors":
        raise ModelUnavailable(f"{source.key}: {path.name} is not safetensors; only safetensors weights load",
                               metadata={"model": source.key})
    if not path.exists():
        raise ModelUnavailable(f"{source.key}: {path} does not exist", metadata={"model": source.key})
    return path


def load_pulid(source: ModelSource, lc: LoadContext) -> PulidModules:
    """Registry loader for ``pulid-flux``: IDFormer + CA modules from ``pulid_flux_v0.9.1.safetensors``."""
    from safetensors.torch import load_file

    path = _single_file(source, (WEIGHTS_FILE,))
    modules = PulidModules.from_state_dict(load_file(str(path)))
    return modules.to(device=lc.device.name, dtype=lc.device.dtype)


def load_dev_pipeline(source: ModelSource, lc: LoadContext) -> Any:
    """Registry loader for ``flux-dev-pipeline``: ``FluxPipeline`` on the ``flux-dev`` source
    (NF4 transformer and T5 on CUDA under fast/hyper), the base PuLID-FLUX was trained on. Never
    compiled: PuLID hooks its blocks per image, and every hook change would recompile them."""
    from diffusers import FluxPipeline

    return flux.load_pipeline(FluxPipeline, lc.source_of("flux-dev"), lc, compile=False)


class EvaVision(nn.Module):
    """EVA02-CLIP-L-14-336's vision tower (timm ``eva02_large_patch14_clip_336``).

    ``forward`` returns PuLID's pair: the projected image embedding (the CLS token after the
    final norm, through the CLIP projection ``head``) and the hidden states entering blocks
    4, 8, 12, 16, 20, caught with forward pre-hooks on the timm blocks.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        self.mean, self.std = tuple(mean), tuple(std)
        size = model.patch_embed.img_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if len(model.blocks) <= max(EVA_HIDDEN_BLOCKS):
            raise ValueError(f"EVA tower has {len(model.blocks)} blocks; PuLID reads the input of block "
                             f"{max(EVA_HIDDEN_BLOCKS)}")

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hidden: dict[int, torch.Tensor] = {}
        handles = [
            self.model.blocks[i].register_forward_pre_hook(lambda _m, args, i=i: hidden.__setitem__(i, args[0]))
            for i in EVA_HIDDEN_BLOCKS
        ]
        try:
            embedding = self.model(pixels)
        finally:
            for handle in handles:
                handle.remove()
        return embedding, [hidden[i] for i in EVA_HIDDEN_BLOCKS]


def _eva_config(source: ModelSource, folder: Path | None) -> dict:
    if folder is not None:
        path = folder / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source.repo, "config.json", revision=source.revision or None))
    return json.loads(path.read_text()) if path.exists() else {}


def load_eva(source: ModelSource, lc: LoadContext) -> EvaVision:
    """Registry loader for ``eva02-clip-l-336``: a timm Eva built from the repo's ``config.json``
    (``architecture``, ``num_classes``, optional ``model_args``) with the weights of
    ``open_clip_model.safetensors`` (open_clip keys ``visual.trunk.*``) or ``model.safetensors``
    (timm keys), converted by timm's own ``checkpoint_filter_fn``."""
    import timm
    from safetensors.torch import load_file
    from timm.models.eva import checkpoint_filter_fn

    path = _single_file(source, EVA_FILES)
    config = _eva_config(source, path.parent if source.local else None)
    pretrained = config.get("pretrained_cfg", {})
    model = timm.create_model(config.get("architecture", EVA_ARCHITECTURE), pretrained=False,
                              num_classes=config.get("num_classes", 768), **config.get("model_args", {}))
    state = checkpoint_filter_fn(load_file(str(path)), model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # timm recomputes RoPE tables; anything else missing means the wrong file.
    missing = [k for k in missing if "rope" not in k]
    if missing or unexpected:
        raise ValueError(f"{source.key}: not an {EVA_ARCHITECTURE} checkpoint (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    eva = EvaVision(model, pretrained.get("mean", CLIP_MEAN), pretrained.get("std", CLIP_STD))
    return eva.eval().to(device=lc.device.name, dtype=lc.device.dtype)


# -- identity tokens ------------------------------------------------------------------------------
@dataclass
class IdentityTokens:
    """The IDFormer's output for one face, and PuLID's neutral one (zero inputs) for true CFG."""

    tokens: torch.Tensor  # (1, num_queries, kv_dim)
    uncond: torch.Tensor


def identity_tokens(modules: PulidModules, eva: EvaVision, face_features: torch.Tensor, embedding: Any
                    ) -> IdentityTokens:
    """Identity tokens from the parsed face image ((1, 3, H, W) in [0, 1]) and the ArcFace embedding."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import normalize, resize

    param = next(modules.parameters())
    with torch.no_grad():
        pixels = resize(face_features.float(), list(eva.image_size), InterpolationMode.BICUBIC)
        pixels = normalize(pixels, list(eva.mean), list(eva.std))
        eva_param = next(eva.parameters())
        vit_embedding, vit_hidden = eva(pixels.to(eva_param.device, eva_param.dtype))
        vit_embedding = vit_embedding / torch.norm(vit_embedding, 2, 1, True)
        arcface = torch.as_tensor(embedding, dtype=torch.float32).reshape(1, -1)
        id_cond = torch.cat([arcface.to(param.device, param.dtype), vit_embedding.to(param.device, param.dtype)], -1)
        vit_hidden = [h.to(param.device, param.dtype) for h in vit_hidden]
        shape = modules.pulid_encoder.shape
        if id_cond.shape[-1] != shape.id_in_dim or vit_hidden[0].shape[-1] != shape.vit_dim:
            raise ModelUnavailable(
                f"pulid-flux expects ArcFace+EVA features of {shape.id_in_dim} and ViT width {shape.vit_dim}, got "
                f"{id_cond.shape[-1]} and {vit_hidden[0].shape[-1]}: the EVA or InsightFace model does not match",
                metadata={"model": "pulid-flux"})
        tokens = modules.pulid_encoder(id_cond, vit_hidden)
        uncond = modules.pulid_encoder(torch.zeros_like(id_cond), [torch.zeros_like(h) for h in vit_hidden])
    return IdentityTokens(tokens, uncond)


# -- injection into the FLUX transformer ----------------------------------------------------------
def injection_blocks(transformer: Any) -> list[Any]:
    """The blocks PuLID follows with a CA module, in the weights' order: double-stream first."""
    return (list(transformer.transformer_blocks)[::DOUBLE_INTERVAL]
            + list(transformer.single_transformer_blocks)[::SINGLE_INTERVAL])


@contextmanager
def injected_identity(transformer: Any, modules: PulidModules, identity: IdentityTokens, strength: float,
                      start_step: int, calls_per_step: int = 1) -> Iterator[None]:
    """Hooks that add ``strength * ca_k(id, img)`` after PuLID's blocks from ``start_step`` on, for
    one pipeline call; ``calls_per_step`` is 2 under true CFG (the second call is the negative one)."""
    blocks = injection_blocks(transformer)
    if len(blocks) != len(modules.pulid_ca):
        raise ModelUnavailable(
            f"pulid-flux has {len(modules.pulid_ca)} CA modules but this FLUX transformer needs {len(blocks)} "
            f"(every {DOUBLE_INTERVAL}nd double and {SINGLE_INTERVAL}th single block): weights for another base",
            metadata={"model": "pulid-flux"})
    param = next(transformer.parameters())
    dtype = param.dtype if param.dtype.is_floating_point else torch.bfloat16  # NF4 weights are uint8
    # The CA modules' device, where the hooks compute: under model CPU offload the transformer's own
    # weights wait on the CPU until its forward moves them.
    device = next(modules.parameters()).device
    tokens = identity.tokens.to(device, dtype)
    uncond = identity.uncond.to(device, dtype)
    state: dict[str, Any] = {"calls": 0, "id": None}

    def before_transformer(_module: Any, _args: Any) -> None:
        step, which = divmod(state["calls"], calls_per_step)
        state["calls"] += 1
        state["id"] = None if step < start_step else (tokens if which == 0 else uncond)

    def after_block(ca: PerceiverAttentionCA) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> Any:
            if state["id"] is None:
                return None
            encoder_hidden_states, hidden_states = output
            delta = ca(state["id"], hidden_states.to(state["id"].dtype)).to(hidden_states.dtype)
            return encoder_hidden_states, hidden_states + strength * delta
        return hook

    handles = [transformer.register_forward_pre_hook(before_transformer)]
    try:
        for block, ca in zip(blocks, modules.pulid_ca, strict=True):
            handles.append(block.register_forward_hook(after_block(ca)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def generate(pipe: Any, sink: ProgressSink, *, modules: PulidModules, identity: IdentityTokens, strength: float,
             start_step: int, prompt: str, width: int, height: int, steps: int, seed: int, guidance: float,
             true_cfg: float = 1.0, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT, preview_every: int = 2,
             **extra: Any) -> Any:
    """One FLUX.1-dev image with the identity injected; ``true_cfg`` > 1 adds PuLID's true CFG."""
    cfg: dict[str, Any] = {}
    if true_cfg > 1.0:
        cfg = {"true_cfg_scale": true_cfg, "negative_prompt": negative_prompt}
    with torch.no_grad(), injected_identity(pipe.transformer, modules, identity, strength, start_step,
                                            calls_per_step=2 if cfg else 1):
        return flux.run_pipeline(
            pipe, sink, steps=steps, height=height, width=width, preview_every=preview_every, prompt=prompt,
            guidance_scale=guidance, generator=flux.generator(flux.execution_device(pipe), seed), **cfg, **extra,
        )
