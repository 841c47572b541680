"""Performance profiles: precision, quantization, acceleration and size limits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    # "nf4" (bitsandbytes 4-bit transformer + T5), "float8" (torchao float8 weights and dynamic
    # activations for the transformer, on compute capability 8.9+; bf16 elsewhere), "bf16" or "fp32".
    quantization: str
    # Longest edge diffusion inputs are downscaled to for inference (the seed's FLUX_MAX_EDGE): the
    # ceiling; the server lowers it to what its memory budget allows (models/memory.py derive_policy:
    # the seed's 512 px under `quality` was its 16 GB card's limit, not the profile's).
    max_inference_edge: int
    # Longest edge a text-to-image request may ask for.
    max_generate_edge: int
    # Registry key of an acceleration LoRA fused under the style LoRAs, if any.
    acceleration_lora: str | None = None
    # Step count that replaces the model's default when the acceleration LoRA is on.
    accelerated_steps: int | None = None
    # Whether the diffusion transformers' repeated blocks are compiled (torch.compile, engines/turbo.py).
    compile: bool = False
    # Whether models are the project's random-weight tiny builds.
    tiny: bool = False
    description: str = ""


PROFILES: dict[str, Profile] = {
    "fast": Profile("fast", "nf4", 1024, 2048, description="NF4 transformer and T5 (bitsandbytes, CUDA)"),
    "hyper": Profile(
        "hyper", "nf4", 1024, 2048, acceleration_lora="hyper-sd", accelerated_steps=8,
        description="NF4 plus the Hyper-SD 8-step acceleration LoRA",
    ),
    "turbo": Profile(
        "turbo", "float8", 1024, 2048, compile=True,
        description="float8 transformer (torchao, Ada/Hopper) and torch.compile; the first job compiles, "
                    "later starts reuse the compile cache in the data dir",
    ),
    "quality": Profile("quality", "bf16", 1024, 2048, description="bf16, slow, maximum fidelity"),
    "tiny": Profile("tiny", "fp32", 512, 1024, tiny=True,
                    description="random-weight tiny models built locally; for tests and demos, no weights"),
}
