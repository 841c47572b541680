"""Multi-step pipelines (the seed's ``[generate] → [auto_mask] → [inpaint]`` chains) as one job.

Each step is a ``JobSpec``: an ordinary capability request. What chains comes from the step
capability's declaration: its ``chains`` fields, when unset, take the current image (the first
output of the latest step that ``makes`` an image) or the current mask (of the latest step that
makes a mask, e.g. segment); with no mask to chain, an inpaint after a cut-out (``Capability.cutout``)
repaints its transparent pixels. Every step is validated on submission, with chained inputs stood in
for by placeholder assets, so a mistake in step 3 is reported before step 1 runs; at run time each
step is prepared again with its real inputs (an auto-mask that selected nothing fails the
inpaint step that needs it, naming the field).
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf.message import Message
from PIL import Image

from paletta.v1 import job_spec_pb2
from paletta_server.capabilities import common, diffusion_io
from paletta_server.capabilities.base import Capability, OutputHandle, PrepareContext, RunContext
from paletta_server.errors import InvalidArgument
from paletta_server.models.profiles import Profile

MAX_STEPS = 16
NAME = "pipeline"


@functools.cache
def _capabilities() -> dict[str, Capability]:
    from paletta_server.capabilities import discover

    return {name: cap for name, cap in discover().items() if name != NAME}


def _placeholders(ctx: PrepareContext) -> dict[str, str]:
    """Stand-ins for chained inputs during validation: a gray image, an all-white mask, a cut-out."""
    cutout = Image.new("RGBA", (64, 64), (128, 128, 128, 0))
    cutout.paste((128, 128, 128, 255), (16, 16, 48, 48))
    return {"image": ctx.assets.put_image(Image.new("RGB", (64, 64), (128, 128, 128))).name,
            "mask": ctx.assets.put_image(Image.new("L", (64, 64), 255)).name,
            "cutout": ctx.assets.put_image(cutout).name}


def _step(spec: job_spec_pb2.JobSpec) -> tuple[str, Capability | None, Message | None]:
    kind = spec.WhichOneof("spec") or ""
    capability = _capabilities().get(kind)
    return kind, capability, capability.request_of(spec) if capability else None


def _prepare_step(capability: Capability, request: Message, ctx: PrepareContext, prefix: str) -> Message:
    try:
        return capability.prepare(request, ctx)
    except InvalidArgument as exc:
        raise InvalidArgument([common.FieldViolation(f"{prefix}.{v.field}", v.description)
                               for v in exc.violations]) from exc


def prepare(request: job_spec_pb2.RunPipelineRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    if not 1 <= len(request.steps) <= MAX_STEPS:
        v.add("steps", f"a pipeline has 1 to {MAX_STEPS} steps, got {len(request.steps)}")
    common.resolve_image(ctx, request.image, "image", required=False)
    start = request.image.asset if request.image.WhichOneof("source") is not None else ""
    current = {"image": bool(start), "mask": False,
               "cutout": bool(start) and diffusion_io.may_be_transparent(ctx.assets.path(start, "image.asset"))}
    placeholders = _placeholders(ctx)
    for i, spec in enumerate(request.steps):
        kind, capability, sub = _step(spec)
        if capability is None or sub is None:
            v.add(f"steps[{i}]", "a step needs one of: " + ", ".join(_capabilities()))
            continue
        prefix = f"steps[{i}].{kind}"
        if sub.HasField("options"):
            v.add(f"{prefix}.options", "job options belong to RunPipelineRequest, not to a step")
        trial, chained = type(sub)(), []
        trial.CopyFrom(sub)
        missing = False
        own_image = any(getattr(sub, name).WhichOneof("source") is not None
                        for name, what in capability.chains.items() if what == "image")
        for field_name, what in capability.chains.items():
            if getattr(sub, field_name).WhichOneof("source") is not None:
                continue
            if not current[what]:
                if what == "mask" and (current["cutout"] or own_image):
                    continue  # left unset: the step repaints its image's transparent pixels (or says why not)
                hint = ("set it, set the pipeline's image, or make one in an earlier step" if what == "image"
                        else "set it, or put a segment (auto mask) or remove_background step before this one")
                v.add(f"{prefix}.{field_name}", f"no {what} to chain yet: {hint}")
                missing = True
                continue
            getattr(trial, field_name).asset = placeholders["cutout" if what == "image" and current["cutout"] else what]
            chained.append(field_name)
        if missing:
            continue
        try:
            prepared = _prepare_step(capability, trial, ctx, prefix)
        except InvalidArgument as exc:
            v.items.extend(exc.violations)
            continue
        sized_by_chain = [name for name in capability.input_sized if chained and not sub.HasField(name)]
        for field_name in chained + sized_by_chain:  # filled from the placeholders: decided at run time
            prepared.ClearField(field_name)
        sub.CopyFrom(prepared)  # keeps what prepare fixed: seeds, defaults, inline images as assets
        if capability.makes:
            current[capability.makes] = True
        if capability.makes == "image":
            current["cutout"] = capability.cutout == "makes" or (capability.cutout == "keeps" and current["cutout"])
    v.raise_if_any()
    return request


def models(request: job_spec_pb2.RunPipelineRequest, profile: Profile) -> list[str]:
    """The first step's models (scheduling affinity); each step pins its own while it runs."""
    if not request.steps:
        return []
    _, capability, sub = _step(request.steps[0])
    return capability.models(sub, profile) if capability and sub else []


class StepContext:
    """The job's RunContext for one step: outputs are tagged with the step; the first one is
    stored at once when a later step chains it."""

    def __init__(self, ctx: RunContext, index: int, kind: str, chained: bool):
        self._ctx, self.index, self.kind, self._chained = ctx, index, kind, chained
        self.first_asset: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def emit_output(self, image: Image.Image | None, *, parameters: dict, seed: int = 0,
                    result: Message | None = None, store_now: bool = False) -> OutputHandle:
        tagged = {"step": self.index, "step_capability": self.kind, **parameters}
        first = self.first_asset is None and image is not None
        handle = self._ctx.emit_output(image, parameters=tagged, seed=seed, result=result,
                                       store_now=store_now or (first and self._chained))
        if first and handle.asset is not None:
            self.first_asset = handle.asset.name
        return handle


def run(request: job_spec_pb2.RunPipelineRequest, ctx: RunContext) -> None:
    prepare_ctx = PrepareContext(ctx.assets, ctx.profile, ctx.config, ctx.styles)
    current = {"image": request.image.asset if request.image.WhichOneof("source") else "", "mask": ""}
    total = len(request.steps)
    for i, spec in enumerate(request.steps):
        ctx.check_cancelled()
        ctx.progress(i, total, "pipeline")
        kind, capability, stored = _step(spec)
        assert capability is not None and stored is not None  # prepare refused unknown steps
        sub = type(stored)()
        sub.CopyFrom(stored)
        for field_name, what in capability.chains.items():
            if getattr(sub, field_name).WhichOneof("source") is None and current[what]:
                getattr(sub, field_name).asset = current[what]
        sub = _prepare_step(capability, sub, prepare_ctx, f"steps[{i}].{kind}")
        ctx.use_models(capability.models(sub, ctx.profile))
        step_ctx = StepContext(ctx, i, kind, chained=bool(capability.makes) and i + 1 < total)
        capability.run(sub, step_ctx)
        if capability.makes and step_ctx.first_asset:
            current[capability.makes] = step_ctx.first_asset
    ctx.progress(total, total, "pipeline")


CAPABILITY = Capability(NAME, job_spec_pb2.RunPipelineRequest, prepare, models, run)
