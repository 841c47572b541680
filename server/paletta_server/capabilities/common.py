"""Validation and input helpers shared by capabilities."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from paletta.v1 import image_pb2
from paletta_server.capabilities.base import PrepareContext
from paletta_server.errors import FieldViolation, InvalidArgument, invalid

MAX_PROMPT = 2000
# Seeds are int64 on the wire (JobOutput.seed included).
SEED_LIMIT = 2**63


class Violations:
    """Collects field violations so a request reports all its problems at once."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field_name: str, description: str) -> None:
        self.items.append(FieldViolation(field_name, description))

    def check(self, ok: bool, field_name: str, description: str) -> None:
        if not ok:
            self.add(field_name, description)

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)


def check_prompt(v: Violations, prompt: str, field_name: str = "prompt", required: bool = True) -> None:
    if required and not prompt.strip():
        v.add(field_name, "must not be empty")
    elif len(prompt) > MAX_PROMPT:
        v.add(field_name, f"must be at most {MAX_PROMPT} characters")


def check_range(v: Violations, value: float, lo: float, hi: float, field_name: str) -> None:
    if not lo <= value <= hi:
        v.add(field_name, f"must be in [{lo:g}, {hi:g}], got {value:g}")


def fill(request: Any, **defaults: Any) -> None:
    """Set each unset optional field to its default, so the job's stored spec says what ran."""
    for name, value in defaults.items():
        if not request.HasField(name):
            setattr(request, name, value)


def given(request: Any, name: str, default: Any) -> Any:
    """An optional field's value, or ``default`` when unset. Prepare fills defaults into the spec;
    run reads through this too, for specs stored by an older version (queued across an upgrade, or
    submitted through an older front end of a shared store)."""
    return getattr(request, name) if request.HasField(name) else default


def default_range(v: Violations, request: Any, name: str, default: float, lo: float, hi: float) -> None:
    """An optional number: checked against [lo, hi] when given, else set to its default."""
    if request.HasField(name):
        check_range(v, getattr(request, name), lo, hi, name)
    fill(request, **{name: default})


def check_size(v: Violations, value: int, max_edge: int, field_name: str) -> None:
    if value <= 0:
        v.add(field_name, f"must be positive, got {value}")
    elif value % 16:
        v.add(field_name, f"must be a multiple of 16, got {value}")
    elif value > max_edge:
        v.add(field_name, f"must be at most {max_edge} in this profile, got {value}")


def default_size(v: Violations, request: Any, default_edge: int, max_edge: int) -> None:
    """Fill unset optional width / height with the default edge (capped to the profile's); check set ones."""
    for name in ("width", "height"):
        if not request.HasField(name):
            setattr(request, name, min(default_edge, max_edge))
        else:
            check_size(v, getattr(request, name), max_edge, name)


def default_count(v: Violations, request: Any, field_name: str, default: int, hi: int) -> None:
    """Fill an unset optional count (steps, variants) with its default; refuse 0 and values outside [1, hi]."""
    if not request.HasField(field_name):
        setattr(request, field_name, default)
    else:
        check_range(v, getattr(request, field_name), 1, hi, field_name)


def default_steps(v: Violations, request: Any, default: int) -> None:
    default_count(v, request, "steps", default, 100)


def default_variants(v: Violations, request: Any) -> None:
    default_count(v, request, "variants", 1, 8)


def check_seed(v: Violations, request: Any, field_name: str = "seed") -> None:
    """Refuse a seed whose variants would leave int64: variant i uses seed + i, and every output
    reports its seed in an int64 field, so the domain is [0, 2^63 - variants]."""
    if not request.HasField(field_name):
        return
    # Requests without variants (Expand) produce one output.
    variants = request.variants if "variants" in request.DESCRIPTOR.fields_by_name else 1
    highest = SEED_LIMIT - max(variants, 1)
    seed = getattr(request, field_name)
    if not 0 <= seed <= highest:
        v.add(field_name, f"must be in [0, {highest}] with {max(variants, 1)} variant(s), got {seed}")


def resolve_seed(request: Any) -> None:
    """Check the seed, or fix a random one, so the job is reproducible and restart-safe."""
    v = Violations()
    check_seed(v, request)
    # Callers run this after their own raise_if_any, so a bad seed is reported on its own.
    v.raise_if_any()
    if not request.HasField("seed"):
        request.seed = random.randrange(0, 2**31)


def resolve_image(ctx: PrepareContext, ref: image_pb2.ImageRef, field_name: str, required: bool = True) -> None:
    """Check an ImageRef; inline bytes are stored as an asset and replaced by its name."""
    which = ref.WhichOneof("source")
    if which is None:
        if required:
            raise invalid(field_name, "an image is required (asset name or inline bytes)")
        return
    if which == "inline":
        info = ctx.assets.put_image_bytes(ref.inline, f"{field_name}.inline")
        ref.asset = info.name
    else:
        ctx.assets.get(ref.asset, f"{field_name}.asset")


def check_styles(v: Violations, ctx: PrepareContext, styles: Any, allowed: bool, mode: str) -> None:
    """Styles apply to FLUX pipelines that take LoRAs (generate, Kontext edit, identity); elsewhere they
    are refused, never ignored."""
    if not styles:
        return
    if not allowed:
        v.add("styles", f"style LoRAs are not supported by {mode}; remove them")
        return
    seen: set[str] = set()
    for i, style in enumerate(styles):
        if style.name in seen:
            v.add(f"styles[{i}].name", f"style {style.name!r} is listed twice; give it once with one weight")
        seen.add(style.name)
        if not ctx.styles.has(style.name):
            v.add(f"styles[{i}].name", f"unknown style {style.name!r}; see StyleService.ListStyles")
        if style.HasField("weight"):
            check_range(v, style.weight, 0.0, 2.0, f"styles[{i}].weight")
        elif ctx.styles.has(style.name):
            style.weight = ctx.styles.get(style.name).default_weight


def check_image_prompt(v: Violations, ctx: PrepareContext, request: Any) -> None:
    if not request.HasField("image_prompt"):
        return
    from paletta_server.engines.ip_adapter import DEFAULT_WEIGHT

    ip = request.image_prompt
    if ip.HasField("weight"):
        check_range(v, ip.weight, 0.0, 2.0, "image_prompt.weight")
    else:
        ip.weight = DEFAULT_WEIGHT
    if ip.image.WhichOneof("source") is None:
        v.add("image_prompt.image", "an image is required")
        return
    resolve_image(ctx, ip.image, "image_prompt.image")


def acceleration_lora(ctx: Any) -> Any:
    """The profile's acceleration LoRA (hyper-sd under ``hyper``) as an engine LoraFile, or None."""
    key = ctx.profile.acceleration_lora
    if not key:
        return None
    from paletta_server.engines.styles import ACCELERATION_WEIGHT, LoraFile

    return LoraFile(key, Path(ctx.model(key)), ACCELERATION_WEIGHT)


def style_loras(ctx: Any, selections: Any) -> list[Any]:
    """A request's StyleSelections resolved to engine LoraFiles: file, weight (or the style's default), trigger."""
    from paletta_server.engines.styles import LoraFile

    tiny_dir = Path(ctx.config.models_dir) / "tiny" / "styles" if ctx.profile.tiny else None
    loras = []
    for selection in selections:
        spec = ctx.styles.get(selection.name)
        loras.append(LoraFile(selection.name, ctx.styles.file(selection.name, tiny_dir),
                              given(selection, "weight", spec.default_weight), spec.trigger_word,
                              f"tiny:{selection.name}" if tiny_dir else spec.source))
    return loras


@contextmanager
def diffusion_extras(pipe: Any, request: Any, ctx: Any) -> Iterator[tuple[str, dict, dict]]:
    """Apply a request's style LoRAs and image prompt to a pipeline for the job's duration.

    Yields (effective prompt, extra pipeline kwargs, applied parameters for the PNG). Models and
    files are resolved here; engines/styles.py and engines/ip_adapter.py get explicit values.
    """
    prompt = request.prompt
    extra: dict[str, Any] = {}
    applied: dict[str, Any] = {}
    with ExitStack() as stack:
        if list(getattr(request, "styles", [])):
            from paletta_server.engines import styles as style_engine

            prompt, applied["styles"] = stack.enter_context(style_engine.applied_styles(
                pipe, style_loras(ctx, request.styles), acceleration_lora(ctx), prompt))
        if request.HasField("image_prompt") if hasattr(request, "image_prompt") else False:
            from paletta_server.engines import ip_adapter

            ip = request.image_prompt
            weight = given(ip, "weight", ip_adapter.DEFAULT_WEIGHT)
            extra.update(stack.enter_context(ip_adapter.applied_image_prompt(
                pipe, ctx.model("ip-adapter"), ctx.model("clip-vit-large"), ctx.open_image(ip.image.asset), weight)))
            applied["image_prompt"] = {"image": ip.image.asset, "weight": round(weight, 4), "model": "ip-adapter"}
        yield prompt, extra, applied
