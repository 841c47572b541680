"""Style LoRAs stacked with diffusers' multi-adapter API, on top of the profile's acceleration LoRA.

A style's LoRA is loaded into a pipeline once, under ``adapter_name = style name``, and stays
there; a job activates the styles it asks for with ``set_adapters(names, weights)`` and the job's
end switches them off again. The base model is never reloaded when styles change: a switch is a
``set_adapters`` call (microseconds), a style used for the first time on a pipeline is one
``load_lora_weights`` (the LoRA file only). At most ``MAX_LOADED_STYLES`` style adapters stay
loaded per pipeline; the least recently used one is deleted beyond that.

Files: safetensors only (a pickled LoRA can run code when loaded). A style's source is its local
path or ``hf_hub_download(repo, weight_name)``; under the ``tiny`` profile a random tiny LoRA is
built per style name into ``<models>/tiny/styles/<name>.safetensors``.

Under the ``hyper`` profile the acceleration LoRA (registry key ``hyper-sd``) is loaded into every
generate/edit pipeline once and stays active at ``ACCELERATION_WEIGHT`` (Hyper-SD's recommended
0.125), alone or together with the job's styles.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from paletta_server.engines.common import LoadContext, ModelSource
from paletta_server.errors import ModelUnavailable

ACCELERATION_WEIGHT = 0.125
MAX_LOADED_STYLES = 5
_build_lock = threading.Lock()


# -- sources --------------------------------------------------------------------------------------
def _safetensors_only(path: Path, what: str) -> Path:
    if path.suffix != ".safetensors":
        raise ModelUnavailable(
            f"{what}: {path.name} is not a .safetensors file; only safetensors LoRAs are loaded",
            metadata={"model": what})
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
        return _safetensors_only(path, source.key)
    from huggingface_hub import hf_hub_download

    return _safetensors_only(Path(hf_hub_download(source.repo, source.filename, revision=source.revision or None)),
                             source.key)


def style_file(ctx: Any, name: str) -> Path:
    """The safetensors file of a style: a tiny build under the tiny profile, else its path or a Hub download."""
    spec = ctx.styles.get(name)
    if ctx.profile.tiny:
        from paletta_server.engines.tiny.flux_family import name_seed, write_lora

        path = Path(ctx.config.models_dir) / "tiny" / "styles" / f"{name}.safetensors"
        with _build_lock:
            if not path.exists():
                write_lora(path, name_seed(name))
        return path
    if spec.path is not None:
        if not Path(spec.path).exists():
            raise ModelUnavailable(f"style {name!r}: {spec.path} does not exist", metadata={"style": name})
        return _safetensors_only(Path(spec.path), f"style {name}")
    from huggingface_hub import hf_hub_download

    try:
        found = hf_hub_download(spec.repo, spec.weight_name)
    except Exception as exc:  # offline, gated, missing: one clear error instead of a stack trace
        raise ModelUnavailable(
            f"style {name!r} ({spec.repo}/{spec.weight_name}) is not available: {type(exc).__name__}: "
            f"{str(exc)[:200]}; download it or give the style a local path in styles.toml",
            metadata={"style": name}) from exc
    return _safetensors_only(Path(found), f"style {name}")


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


def ensure_acceleration(pipe: Any, ctx: Any) -> str | None:
    """Under a profile with an acceleration LoRA, load it into this pipeline once and keep it active."""
    key = ctx.profile.acceleration_lora
    if not key:
        return None
    state = _state(pipe)
    if state["acceleration"] != key:
        path = ctx.model(key)
        _load_adapter(pipe, Path(path), key)
        state["acceleration"] = key
        _activate(pipe, [], [], key)
    return key


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
def applied_styles(pipe: Any, styles: Any, ctx: Any, prompt: str) -> Iterator[tuple[str, list[dict]]]:
    """Activate a request's ``StyleSelection``s for the job; yields (prompt with triggers, applied list).

    Trigger words of the styles with a positive weight are prepended, comma-separated, in request
    order; the same style twice adds its weights.
    """
    state = _state(pipe)
    acceleration = ensure_acceleration(pipe, ctx)
    names: list[str] = []
    weights: list[float] = []
    applied: list[dict] = []
    triggers: list[str] = []
    for selection in styles:
        spec = ctx.styles.get(selection.name)
        weight = float(selection.weight) if selection.HasField("weight") else float(spec.default_weight)
        if selection.name not in state["styles"]:
            _load_adapter(pipe, style_file(ctx, selection.name), selection.name)
        else:
            state["styles"].remove(selection.name)
        state["styles"].append(selection.name)  # most recently used last
        if selection.name in names:  # the same style twice: weights add up
            weights[names.index(selection.name)] += weight
            continue
        names.append(selection.name)
        weights.append(weight)
        # A style at weight 0 is off: its trigger words would change the image on their own.
        if weight > 0 and spec.trigger_word and spec.trigger_word not in triggers:
            triggers.append(spec.trigger_word)
        applied.append({"name": selection.name, "weight": round(weight, 4), "trigger_word": spec.trigger_word,
                        "source": spec.source if not ctx.profile.tiny else f"tiny:{selection.name}"})
    _evict_styles(pipe, state, keep=set(names))
    _activate(pipe, names, weights, acceleration)
    effective = ", ".join(triggers + [prompt]) if triggers else prompt
    try:
        yield effective, applied
    finally:
        # The next job starts clean: only the acceleration LoRA (if any) stays active.
        _activate(pipe, [], [], acceleration)


def _evict_styles(pipe: Any, state: dict, keep: set[str]) -> None:
    while len(state["styles"]) > MAX_LOADED_STYLES:
        victim = next((n for n in state["styles"] if n not in keep), None)
        if victim is None:
            return
        pipe.delete_adapters(victim)
        state["styles"].remove(victim)
