"""Style LoRAs stacked with diffusers' multi-adapter API, on top of the profile's acceleration LoRA.

A style's LoRA is loaded into a pipeline once, under ``adapter_name = style name``, and stays
there; a job activates the styles it asks for with ``set_adapters(names, weights)`` and the job's
end switches them off again. The base model is never reloaded when styles change: a switch is a
``set_adapters`` call (microseconds), a style used for the first time on a pipeline is one
``load_lora_weights`` (the LoRA file only). At most ``MAX_LOADED_STYLES`` style adapters stay
loaded per pipeline; the least recently used one is deleted beyond that.

Files: safetensors only (a pickled LoRA can run code when loaded). The capability resolves each
style to a ``LoraFile`` (models/styles.py finds the file); the engine only loads and weighs them.

Under the ``hyper`` profile the acceleration LoRA (registry key ``hyper-sd``) is loaded into every
generate/edit pipeline once and stays active at ``ACCELERATION_WEIGHT`` (Hyper-SD's recommended
0.125), alone or together with the job's styles.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paletta_server.errors import ModelUnavailable
from paletta_server.models.types import LoadContext, ModelSource

ACCELERATION_WEIGHT = 0.125
MAX_LOADED_STYLES = 5


@dataclass(frozen=True)
class LoraFile:
    """One LoRA a job applies: its adapter name, safetensors file and weight."""

    name: str
    path: Path
    weight: float
    trigger_word: str = ""
    source: str = ""  # where it came from, for the output's parameters


# -- sources --------------------------------------------------------------------------------------
def safetensors_only(path: Path, what: str, metadata: dict[str, str]) -> Path:
    """``path`` if it is a readable safetensors file (its header is parsed; no tensor is read)."""
    if path.suffix != ".safetensors":
        raise ModelUnavailable(
            f"{what}: {path.name} is not a .safetensors file; only safetensors LoRAs are loaded",
            metadata=metadata)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:  # a pickle renamed, a truncated download: the file, not the job, is at fault
        raise ModelUnavailable(f"{what}: {path} is not a valid safetensors file ({type(exc).__name__}: "
                               f"{str(exc)[:200]})", metadata=metadata) from exc
    return path


def load_lora_source(source: ModelSource, lc: LoadContext) -> Path:
    """Registry loader for LoRA keys (hyper-sd): resolves the safetensors file, loads nothing yet.

    The LoRA itself is loaded into each pipeline that uses it (``ensure_acceleration``), so the
    resident object is just the file's path.
    """
    if source.local:
        path = Path(source.path)
        if path.is_dir():
            path = path / source.filename
        if not path.exists():
            raise ModelUnavailable(f"{source.key}: {path} does not exist", metadata={"model": source.key})
        return safetensors_only(path, source.key, {"model": source.key})
    from huggingface_hub import hf_hub_download

    return safetensors_only(Path(hf_hub_download(source.repo, source.filename, revision=source.revision or None)),
                            source.key, {"model": source.key})


# -- adapters on a pipeline -----------------------------------------------------------------------
def _state(pipe: Any) -> dict:
    """Per-pipeline bookkeeping: which adapters are loaded, in least-recently-used order."""
    state = getattr(pipe, "_paletta_lora", None)
    if state is None:
        state = {"styles": [], "acceleration": None}
        pipe._paletta_lora = state
    return state


def _load_adapter(pipe: Any, path: Path, adapter_name: str) -> None:
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)


def ensure_acceleration(pipe: Any, acceleration: LoraFile | None) -> str | None:
    """Under a profile with an acceleration LoRA, load it into this pipeline once and keep it active."""
    if acceleration is None:
        return None
    state = _state(pipe)
    if state["acceleration"] != acceleration.name:
        _load_adapter(pipe, acceleration.path, acceleration.name)
        state["acceleration"] = acceleration.name
        _activate(pipe, [], [], acceleration.name)
    return acceleration.name


def _activate(pipe: Any, names: list[str], weights: list[float], acceleration: str | None) -> None:
    if acceleration:
        names, weights = names + [acceleration], weights + [ACCELERATION_WEIGHT]
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=weights)
    else:
        pipe.disable_lora()


def loaded_styles(pipe: Any) -> list[str]:
    return list(_state(pipe)["styles"])


@contextmanager
def applied_styles(pipe: Any, styles: list[LoraFile], acceleration: LoraFile | None, prompt: str
                   ) -> Iterator[tuple[str, list[dict]]]:
    """Activate a job's style LoRAs; yields (prompt with trigger words, applied list).

    Trigger words of the styles with a positive weight are prepended, comma-separated, in request
    order; the same style twice adds its weights.
    """
    state = _state(pipe)
    accelerated = ensure_acceleration(pipe, acceleration)
    names: list[str] = []
    weights: list[float] = []
    applied: list[dict] = []
    triggers: list[str] = []
    for lora in styles:
        if lora.name not in state["styles"]:
            _load_adapter(pipe, lora.path, lora.name)
        else:
            state["styles"].remove(lora.name)
        state["styles"].append(lora.name)  # most recently used last
        if lora.name in names:  # the same style twice: weights add up
            weights[names.index(lora.name)] += lora.weight
            continue
        names.append(lora.name)
        weights.append(lora.weight)
        # A style at weight 0 is off: its trigger words would change the image on their own.
        if lora.weight > 0 and lora.trigger_word and lora.trigger_word not in triggers:
            triggers.append(lora.trigger_word)
        applied.append({"name": lora.name, "weight": round(lora.weight, 4), "trigger_word": lora.trigger_word,
                        "source": lora.source})
    _evict_styles(pipe, state, keep=set(names))
    _activate(pipe, names, weights, accelerated)
    effective = ", ".join(triggers + [prompt]) if triggers else prompt
    try:
        yield effective, applied
    finally:
        # The next job starts clean: only the acceleration LoRA (if any) stays active.
        _activate(pipe, [], [], accelerated)


def _evict_styles(pipe: Any, state: dict, keep: set[str]) -> None:
    while len(state["styles"]) > MAX_LOADED_STYLES:
        victim = next((n for n in state["styles"] if n not in keep), None)
        if victim is None:
            return
        pipe.delete_adapters(victim)
        state["styles"].remove(victim)
