"""Memory planning: what a model costs on the device, and the pure rules the residency manager follows.

No torch at import: ``plan`` and ``derive_policy`` are plain functions over byte counts, tested
without a model (tests/test_memory.py); ``measure_footprint`` (torch, lazily) turns a loaded
pipeline into a ``Footprint``.

A model's ``Footprint``:
- ``weights``: bytes on the device when the whole model is resident;
- ``offload_peak``: bytes on the device at once under model CPU offload (diffusers'
  ``enable_model_cpu_offload``: one component at a time, e.g. the text encoders go back to the CPU
  once the prompt is encoded; a ControlNet stays beside its transformer); 0 = cannot offload;
- ``working``: activation bytes of one job at a 1024² inference size (scales with the pixels);
- ``family``: a diffusion family (FLUX schnell / Kontext / Fill / ControlNet / dev (identity),
  Qwen-Image-Edit).

Rules of ``plan`` (budget = bytes models and activations may use; resident models in LRU order):
1. A family whose budget does not keep two families (``keep_two_families`` false) first evicts the
   other families that are not pinned.
2. If the model fits whole (others + weights + working ≤ budget), load it whole, evicting more
   unpinned models when needed: other families first (least recently used first), then the rest.
3. Else, when it can be offloaded and others + offload_peak + working fits after evicting every
   unpinned model that must go, load it offloaded (this costs speed, so only when the budget needs it).
4. Else refuse (RESOURCE_EXHAUSTED, reason MEMORY_BUDGET), naming the model and the bytes; nothing is
   evicted by a refusal.

``derive_policy`` (issue 12.4): the inference edge is the longest of 1024, 896, 768, 640, 512 (not
above the profile's ceiling) at which the profile's largest FLUX family fits the budget whole or
offloaded with its working memory; when none does, 512 (the seed's limit on its 16 GB card).
Two families may stay resident when two of them plus one job's working memory fit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

GB = 10**9
GiB = 1024**3
EDGES = (2048, 1536, 1280, 1024, 896, 768, 640, 512)
FLOOR_EDGE = 512
# Families whose footprint sets the inference edge (the ones every diffusion capability uses).
EDGE_FAMILIES = ("flux-schnell", "flux-kontext", "flux-fill")


@dataclass(frozen=True)
class Footprint:
    weights: int
    offload_peak: int = 0
    working: int = 0
    family: bool = False

    def working_at(self, edge: int) -> int:
        return int(self.working * (edge / 1024) ** 2)

    def whole(self, edge: int) -> int:
        return self.weights + self.working_at(edge)

    def offloaded(self, edge: int) -> int:
        return self.offload_peak + self.working_at(edge) if self.offload_peak else 0


def _flux(transformer: float, t5: float, rest: float, working: float, extra: float = 0.0) -> Footprint:
    """A FLUX-family pipeline: weights = all; offload peak = transformer (+ a ControlNet beside it)."""
    weights = transformer + t5 + rest + extra
    return Footprint(int(weights * GB), int((transformer + extra) * GB), int(working * GB), family=True)


# Estimates at full size by effective quantization (GB = 10^9). FLUX NF4: 10.46 GB resident, peak
# 14.09 GB at 1024² measured on H100 and H200 (shared/notes/gpu.md): transformer ≈ 7.2, T5-XXL ≈ 2.9,
# CLIP-L + VAE ≈ 0.4, activations (VAE decode included) ≈ 3.6 → 3.9 with a margin. bf16: 33.7 resident,
# 36.4 peak. ControlNet Union-Pro (5 + 10 blocks, 3.3 B parameters): 6.6 GB bf16, ≈ 1.9 NF4.
# Qwen-Image-Edit: 20.4 B MMDiT (≈ 11.6 NF4, 40.9 bf16) + Qwen2.5-VL-7B (≈ 6.3 NF4 with its bf16
# embeddings and head, 16.6 bf16) + VAE 0.25; two passes of true CFG, 8 k image tokens at 1024².
# flux-dev-pipeline (identity's FluxPipeline on FLUX.1-dev) is the same 12 B transformer + T5 + CLIP-L +
# VAE, so the same footprint (not measured on a GPU: an estimate by analogy); PuLID's CA modules, EVA
# and the face models are separate registry keys planned beside it.
# float8 (turbo: only the transformers, and the ControlNet, quantized; one byte a weight plus per-row
# scales; the text encoders stay bf16): estimated from the parameter counts, not yet measured.
ESTIMATES: dict[str, dict[str, Footprint]] = {
    **{key: {"nf4": _flux(7.2, 2.9, 0.4, 3.9), "bf16": _flux(23.8, 9.5, 0.4, 3.0),
             "float8": _flux(12.0, 9.5, 0.4, 3.0)}
       for key in ("flux-schnell", "flux-kontext", "flux-fill", "flux-dev-pipeline")},
    "flux-controlnet-union": {"nf4": _flux(7.2, 2.9, 0.4, 4.2, extra=1.9),
                              "bf16": _flux(23.8, 9.5, 0.4, 3.3, extra=6.6),
                              "float8": _flux(12.0, 9.5, 0.4, 3.3, extra=3.4)},
    "qwen-image-edit": {"nf4": Footprint(int(18.2 * GB), int(11.6 * GB), int(4.0 * GB), family=True),
                        "bf16": Footprint(int(57.8 * GB), int(40.9 * GB), int(4.0 * GB), family=True),
                        "float8": Footprint(int(37.5 * GB), int(20.6 * GB), int(4.0 * GB), family=True)},
}
FAMILY_KEYS = frozenset(ESTIMATES)


def estimate(key: str, quantization: str, fallback_bytes: int = 0) -> Footprint:
    """The table's footprint for this quantization (fp32 = twice bf16), else the registry's estimate."""
    table = ESTIMATES.get(key)
    if table is None:
        return Footprint(fallback_bytes)
    if quantization in table:
        return table[quantization]
    bf16 = table["bf16"]
    return Footprint(bf16.weights * 2, bf16.offload_peak * 2, bf16.working * 2, family=True)


@dataclass(frozen=True)
class Plan:
    evict: tuple[str, ...] = ()
    offload: bool = False
    # Why the model cannot fit, when it cannot; then nothing is evicted.
    refuse: str = ""
    # Bytes the plan puts on the device for this model: whole or offloaded, working memory included.
    needed: int = 0
    # Bytes the models that stay hold (pinned or not evicted), for the message.
    kept: int = 0


def plan(budget: int, resident: Iterable[tuple[str, int, bool]], pinned: set[str], key: str,
         footprint: Footprint, edge: int = 1024, keep_two_families: bool = True) -> Plan:
    """Evictions / offload / refusal for loading ``key``. ``resident`` = (key, bytes on the device,
    is a family) least recently used first, ``key`` itself excluded (it is being (re)placed)."""
    others = [(k, b, fam) for k, b, fam in resident if k != key]
    held = {k: b for k, b, _ in others}
    evictable = [k for k, _, _ in others if k not in pinned]
    families = [k for k, _, fam in others if fam and k not in pinned]
    order = families + [k for k in evictable if k not in families]  # other families first, LRU within
    evict: list[str] = []
    if footprint.family and not keep_two_families:
        evict += families

    def used() -> int:
        return sum(b for k, b in held.items() if k not in evict)

    def room_for(needed: int) -> list[str] | None:
        chosen = list(evict)
        for victim in order:
            if sum(b for k, b in held.items() if k not in chosen) + needed <= budget:
                return chosen
            if victim not in chosen:
                chosen.append(victim)
        return chosen if sum(b for k, b in held.items() if k not in chosen) + needed <= budget else None

    whole = footprint.whole(edge)
    chosen = room_for(whole)
    if chosen is not None:
        return Plan(tuple(chosen), False, needed=whole, kept=sum(b for k, b in held.items() if k not in chosen))
    offloaded = footprint.offloaded(edge)
    if offloaded:
        chosen = room_for(offloaded)
        if chosen is not None:
            return Plan(tuple(chosen), True, needed=offloaded,
                        kept=sum(b for k, b in held.items() if k not in chosen))
    pinned_bytes = sum(b for k, b in held.items() if k in pinned)
    smallest = offloaded or whole
    why = (f"{key} needs {smallest} bytes on the device ({'offloaded' if offloaded else 'whole'}, "
           f"{footprint.working_at(edge)} of them working memory at {edge} px) but the memory budget is "
           f"{budget} bytes")
    if pinned_bytes:
        why += f", {pinned_bytes} of them held by models the job also uses"
    return Plan(refuse=why, needed=smallest, kept=used())


@dataclass(frozen=True)
class Policy:
    inference_edge: int
    keep_two_families: bool


def derive_policy(budget: int, families: Iterable[Footprint], ceiling: int) -> Policy:
    """The inference edge and two-family residency for a budget (rule in the module docstring)."""
    biggest = max(families, key=lambda f: f.weights, default=Footprint(0))
    if biggest.weights == 0:  # nothing known (tiny builds): the profile's own ceiling
        return Policy(ceiling, True)
    edge = min(FLOOR_EDGE, ceiling)
    for candidate in EDGES:
        if candidate > ceiling:
            continue
        fits = biggest.whole(candidate) <= budget or 0 < biggest.offloaded(candidate) <= budget
        if fits:
            edge = candidate
            break
    keep_two = 2 * biggest.weights + biggest.working_at(edge) <= budget
    return Policy(edge, keep_two)


def format_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 1024**2:.1f} MiB"


def measure_footprint(obj: Any, working: int = 0, family: bool = False) -> Footprint:
    """Measured bytes of a loaded model; for a diffusers pipeline also its offload peak: the largest
    component of ``model_cpu_offload_seq`` plus the modules outside it (a ControlNet stays beside its
    transformer)."""
    from paletta_server.engines.common import measure_bytes

    total = measure_bytes(obj)
    components = getattr(obj, "components", None)
    seq = getattr(obj, "model_cpu_offload_seq", None)
    if not isinstance(components, dict) or not seq or not hasattr(obj, "enable_model_cpu_offload"):
        return Footprint(total, 0, working, family)
    import torch

    sizes = {name: measure_bytes(m) for name, m in components.items() if isinstance(m, torch.nn.Module)}
    chain = [n for n in seq.split("->") if n in sizes]
    beside = sum(b for n, b in sizes.items() if n not in chain)
    peak = max((sizes[n] for n in chain), default=0) + beside
    return Footprint(total, peak if peak < total else 0, working, family)
