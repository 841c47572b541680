"""Style LoRA registry: the seed's five built-ins plus ``styles.toml`` / ``styles.json`` in the data dir.

A style's ``source`` is ``"<repo id>/<file>.safetensors"`` or a local ``.safetensors`` path.
Only safetensors files are accepted (pickled ``.bin``/``.pt`` LoRAs can run code on load).
"""

from __future__ import annotations

import json
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

from paletta_server.errors import ModelUnavailable

TINY_BUILDER = "paletta_server.engines.tiny.flux_family:build_style"


@dataclass(frozen=True)
class StyleSpec:
    name: str
    label: str
    best_for: str
    trigger_word: str
    default_weight: float
    repo: str = ""
    weight_name: str = ""
    path: Path | None = None

    @property
    def source(self) -> str:
        return str(self.path) if self.path else f"{self.repo}/{self.weight_name}"


BUILTIN_STYLES: tuple[StyleSpec, ...] = (
    StyleSpec("realism", "XLabs Realism", "photoreal sci-fi (mecha, EVA suits, station)", "", 1.0,
              "XLabs-AI/flux-RealismLora", "lora.safetensors"),
    StyleSpec("koda", "Koda (analog film)", "cinematic, Tarkovsky-Solaris vibe", "flmft style", 1.0,
              "alvdansen/flux-koda", "araminta_k_flux_koda.safetensors"),
    StyleSpec("tarot", "Tarot card", "ornate fantasy, mystical, symbolic",
              "in the style of TOK a trtcrd tarot style", 1.0,
              "multimodalart/flux-tarot-v1", "flux_tarot_v1_lora.safetensors"),
    StyleSpec("ghibsky", "Ghibsky", "cosy-fantasy landscapes, Ghibli-esque", "GHIBSKY style", 1.0,
              "aleksa-codes/flux-ghibsky-illustration", "lora.safetensors"),
    StyleSpec("anime", "Synthetic Anime", "anime/manga keyframes, character art", "", 1.0,
              "dataautogpt3/FLUX-SyntheticAnime", "Flux_1_Dev_LoRA_syntheticanime.safetensors"),
)


class StyleRegistry:
    def __init__(self, data_dir: Path):
        self._build_lock = threading.Lock()
        self._styles = {s.name: s for s in BUILTIN_STYLES}
        for path in (data_dir / "styles.toml", data_dir / "styles.json"):
            if path.exists():
                self._styles.update({s.name: s for s in _read_extra(path, data_dir)})

    def has(self, name: str) -> bool:
        return name in self._styles

    def get(self, name: str) -> StyleSpec:
        return self._styles[name]

    def all(self) -> list[StyleSpec]:
        return [self._styles[k] for k in sorted(self._styles)]

    def file(self, name: str, tiny_dir: Path | None = None) -> Path:
        """A style's safetensors file: its local path or a Hub download; with ``tiny_dir`` (the
        tiny profile) a random tiny LoRA built there on first use."""
        from paletta_server.engines.common import import_object
        from paletta_server.engines.styles import safetensors_only

        spec = self._styles[name]
        if tiny_dir is not None:
            path = tiny_dir / f"{name}.safetensors"
            with self._build_lock:
                if not path.exists():
                    import_object(TINY_BUILDER)(path, name)
            return path
        if spec.path is not None:
            if not spec.path.exists():
                raise ModelUnavailable(f"style {name!r}: {spec.path} does not exist", metadata={"style": name})
            return safetensors_only(spec.path, f"style {name}", {"style": name})
        from huggingface_hub import hf_hub_download

        try:
            found = hf_hub_download(spec.repo, spec.weight_name)
        except Exception as exc:  # offline, gated, missing: one clear error instead of a stack trace
            raise ModelUnavailable(
                f"style {name!r} ({spec.repo}/{spec.weight_name}) is not available: {type(exc).__name__}: "
                f"{str(exc)[:200]}; download it or give the style a local path in styles.toml",
                metadata={"style": name}) from exc
        return safetensors_only(Path(found), f"style {name}", {"style": name})


def _read_extra(path: Path, data_dir: Path) -> list[StyleSpec]:
    """Entries: {name, label, best_for, trigger_word, default_weight, and path or repo + weight_name}."""
    raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    entries = raw.get("styles", raw) if isinstance(raw, dict) else raw
    if isinstance(entries, dict):
        entries = [{"name": k, **v} for k, v in entries.items()]
    specs = []
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{path}: style entry {i + 1} needs a name")
        local = entry.get("path")
        file_name = local or entry.get("weight_name", "")
        if not str(file_name).endswith(".safetensors"):
            raise ValueError(f"{path}: style {name!r} must be a .safetensors file")
        if not local and not entry.get("repo"):
            raise ValueError(f"{path}: style {name!r} needs a path, or a repo and a weight_name")
        weight = entry.get("default_weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0.0 <= weight <= 2.0:
            raise ValueError(f"{path}: style {name!r}: default_weight must be a number in [0, 2], got {weight!r}")
        specs.append(StyleSpec(
            name=name, label=entry.get("label", name), best_for=entry.get("best_for", ""),
            trigger_word=entry.get("trigger_word", ""), default_weight=float(weight),
            repo=entry.get("repo", ""), weight_name=entry.get("weight_name", ""),
            path=(data_dir / local) if local else None,
        ))
    return specs
