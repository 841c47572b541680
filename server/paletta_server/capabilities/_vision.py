"""Helpers shared by the vision and helper capabilities (upscale, background, segment, detect,
caption, prompt): image checks on the request path and single-step progress on the device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from paletta.v1 import image_pb2
from paletta_server.capabilities import common
from paletta_server.capabilities.base import PrepareContext, RunContext

T = TypeVar("T")


def prepare_image(v: common.Violations, ctx: PrepareContext, ref: image_pb2.ImageRef,
                  field_name: str = "image") -> tuple[int, int] | None:
    """Resolve a required ImageRef (inline bytes become an asset); return its (width, height).

    Images over the configured pixel limit are refused here, naming the field.
    """
    common.resolve_image(ctx, ref, field_name)
    info = ctx.assets.get(ref.asset, f"{field_name}.asset")
    limit = ctx.config.max_image_pixels
    if info.width * info.height > limit:
        v.add(field_name, f"image of {info.width}x{info.height} exceeds the limit of {limit} pixels")
        return None
    return info.width, info.height


def check_threshold(v: common.Violations, request: Any, default: float,
                    field_name: str = "threshold") -> None:
    """Fill an unset optional threshold with its default; refuse values outside [0, 1]."""
    common.default_range(v, request, field_name, default, 0.0, 1.0)


def check_tokens(v: common.Violations, value: int, default: int, field_name: str = "max_tokens") -> int:
    if value == 0:
        return default
    common.check_range(v, value, 1, 512, field_name)
    return value


def inference(ctx: RunContext, fn: Callable[[], T]) -> T:
    """Run one model call as the single step of the "inference" stage."""
    ctx.check_cancelled()
    ctx.progress(0, 1, "inference")
    result = fn()
    ctx.progress(1, 1, "inference")
    return result
