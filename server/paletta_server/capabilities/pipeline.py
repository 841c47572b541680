"""Multi-step pipelines (the seed's ``[generate] → [auto_mask] → [inpaint]`` chains) as one job.

Each step is an ordinary capability request. Unset image inputs chain: ``image`` /
``control_image`` take the current image (the first output of the latest image-making step),
an inpaint ``mask`` takes the mask of the latest ``auto_mask`` step. Every step is validated on
submission, with chained inputs stood in for by placeholder assets, so a mistake in step 3 is
reported before step 1 runs; at run time each step is prepared again with its real inputs
(an auto-mask that selected nothing fails the inpaint step that needs it, naming the field).
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf.message import Message
from PIL import Image

from paletta.v1 import pipeline_service_pb2
from paletta_server.capabilities import common
from paletta_server.capabilities.base import Capability, PrepareContext, RunContext
from paletta_server.errors import InvalidArgument
from paletta_server.models.profiles import Profile

MAX_STEPS = 16
# step kind -> (capability name, the ImageRef field that chains, or "")
STEPS = {
    "generate": ("generate", ""),
    "edit": ("edit", "image"),
    "auto_mask": ("segment", "image"),
    "inpaint": ("inpaint", "image"),
    "outpaint": ("outpaint", "image"),
    "qwen_edit": ("qwen_edit", "image"),
    "control": ("control", "control_image"),
    "upscale": ("upscale", "image"),
    "remove_background": ("remove_background", "image"),
}
JOB_OPTIONS = ("request_id", "priority", "cancel_on_disconnect")


@functools.cache
def _capabilities() -> dict[str, Capability]:
    from paletta_server.capabilities import discover

    return discover()


def _placeholders(ctx: PrepareContext) -> tuple[str, str]:
    """Stand-ins for chained inputs during validation: a gray image and an all-white mask."""
    image = ctx.assets.put_image(Image.new("RGB", (64, 64), (128, 128, 128))).name
    mask = ctx.assets.put_image(Image.new("L", (64, 64), 255)).name
    return image, mask


def _prepare_step(kind: str, step: Message, ctx: PrepareContext, prefix: str) -> Message:
    try:
        return _capabilities()[STEPS[kind][0]].prepare(step, ctx)
    except InvalidArgument as exc:
        raise InvalidArgument([common.FieldViolation(f"{prefix}.{v.field}", v.description)
                               for v in exc.violations]) from exc


def prepare(request: pipeline_service_pb2.RunPipelineRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    if not 1 <= len(request.steps) <= MAX_STEPS:
        v.add("steps", f"a pipeline has 1 to {MAX_STEPS} steps, got {len(request.steps)}")
    common.resolve_image(ctx, request.image, "image", required=False)
    has_image = request.image.WhichOneof("source") is not None
    has_mask = False
    placeholder_image, placeholder_mask = _placeholders(ctx)
    for i, step in enumerate(request.steps):
        kind = step.WhichOneof("step")
        if kind is None:
            v.add(f"steps[{i}]", "a step needs one of: " + ", ".join(STEPS))
            continue
        prefix, sub = f"steps[{i}].{kind}", getattr(step, kind)
        for option in JOB_OPTIONS:
            if getattr(sub, option):
                v.add(f"{prefix}.{option}", "job options belong to RunPipelineRequest, not to a step")
        trial, chained = type(sub)(), []
        trial.CopyFrom(sub)
        image_field = STEPS[kind][1]
        if image_field and getattr(sub, image_field).WhichOneof("source") is None:
            if not has_image:
                v.add(f"{prefix}.{image_field}", "no image to chain yet: set it, set the pipeline's image, "
                                                 "or make one in an earlier step")
                continue
            getattr(trial, image_field).asset = placeholder_image
            chained.append(image_field)
        if kind == "inpaint" and sub.mask.WhichOneof("source") is None:
            if not has_mask:
                v.add(f"{prefix}.mask", "no mask to chain: set it or put an auto_mask step before this one")
                continue
            trial.mask.asset = placeholder_mask
            chained.append("mask")
        try:
            prepared = _prepare_step(kind, trial, ctx, prefix)
        except InvalidArgument as exc:
            v.items.extend(exc.violations)
            continue
        for name in chained:
            prepared.ClearField(name)
        sub.CopyFrom(prepared)  # keeps what prepare fixed: seeds, defaults, inline images as assets
        has_image = has_image or kind != "auto_mask"
        has_mask = has_mask or kind == "auto_mask"
    v.raise_if_any()
    return request


def models(request: pipeline_service_pb2.RunPipelineRequest, profile: Profile) -> list[str]:
    """The first step's models (scheduling affinity); each step pins its own while it runs."""
    if not request.steps:
        return []
    kind = request.steps[0].WhichOneof("step")
    return _capabilities()[STEPS[kind][0]].models(getattr(request.steps[0], kind), profile)


class StepContext:
    """The job's RunContext for one step: outputs are tagged with the step and remembered."""

    def __init__(self, ctx: RunContext, index: int, kind: str):
        self._ctx, self.index, self.kind = ctx, index, kind
        self.first_asset: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def emit_output(self, image: Image.Image | None, *, parameters: dict, seed: int = 0,
                    result: Message | None = None) -> Any:
        tagged = {"step": self.index, "step_capability": STEPS[self.kind][0], **parameters}
        info = self._ctx.emit_output(image, parameters=tagged, seed=seed, result=result)
        if info is not None and self.first_asset is None:
            self.first_asset = info.name
        return info


def run(request: pipeline_service_pb2.RunPipelineRequest, ctx: RunContext) -> None:
    prepare_ctx = PrepareContext(ctx.assets, ctx.profile, ctx.config, ctx.styles)
    image = request.image.asset if request.image.WhichOneof("source") else ""
    mask = ""
    total = len(request.steps)
    for i, step in enumerate(request.steps):
        ctx.check_cancelled()
        ctx.progress(i, total, "pipeline")
        kind = step.WhichOneof("step")
        sub = type(getattr(step, kind))()
        sub.CopyFrom(getattr(step, kind))
        image_field = STEPS[kind][1]
        if image_field and getattr(sub, image_field).WhichOneof("source") is None:
            getattr(sub, image_field).asset = image
        if kind == "inpaint" and sub.mask.WhichOneof("source") is None:
            sub.mask.asset = mask
        sub = _prepare_step(kind, sub, prepare_ctx, f"steps[{i}].{kind}")
        capability = _capabilities()[STEPS[kind][0]]
        ctx.use_models(capability.models(sub, ctx.profile))
        step_ctx = StepContext(ctx, i, kind)
        capability.run(sub, step_ctx)
        if kind == "auto_mask":
            mask = step_ctx.first_asset or mask
        elif step_ctx.first_asset:
            image = step_ctx.first_asset
    ctx.progress(total, total, "pipeline")


CAPABILITY = Capability("pipeline", pipeline_service_pb2.RunPipelineRequest, prepare, models, run)
