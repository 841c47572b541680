"""Domain types of the model layer, shared with the engines: where a model runs, where it loads from.

A leaf module (no imports from the rest of Paletta), so engines may use these types without
depending on the registry or the residency manager.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Device:
    """Where models run and in which precision."""

    name: str  # "cuda" or "cpu"
    quantization: str  # effective: "nf4", "float8", "bf16" or "fp32"
    note: str = ""  # why a fallback happened, shown in GetStatus

    @property
    def dtype(self):
        import torch

        return torch.bfloat16 if self.quantization in ("nf4", "float8", "bf16") else torch.float32



@dataclass(frozen=True)
class ModelSource:
    """Where a model loads from: a Hugging Face repo at a revision, or a local folder or file."""

    key: str
    repo: str = ""
    revision: str = ""
    path: Path | None = None
    filename: str = ""

    @property
    def local(self) -> bool:
        return self.path is not None

    def describe(self) -> str:
        if self.path:
            return str(self.path)
        return f"{self.repo}@{self.revision}" if self.revision else self.repo


@dataclass(frozen=True)
class LoadContext:
    """What a registry loader gets besides its own source."""

    profile: Any  # models.profiles.Profile: name, quantization, tiny, acceleration settings
    device: Device
    # Source of another registry key (e.g. the FLUX.1-dev base under a ControlNet); builds tiny ones.
    source_of: Callable[[str], ModelSource]
    # Where loaders may cache converted weights (NF4-quantized components), inside the data dir.
    cache_dir: Path | None = None
    # Where compiled code is cached (the turbo profile; engines/turbo.py), inside the data dir.
    compile_cache: Path | None = None
    # The memory plan needs model CPU offload for this model (engines/flux.py: components are loaded,
    # then kept on the CPU and moved to the device one at a time while the job runs).
    offload: bool = False
