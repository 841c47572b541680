"""The page's modes: one per capability, each with its own fields, defaults and ranges.

Defaults and ranges are the server's, as the proto comments state them (``proto/paletta/v1``).
A field whose value is None is left unset, so the server applies its own default. Pure data
and request building: no UI here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

import paletta
from paletta.v1 import (
    background_pb2,
    caption_pb2,
    control_pb2,
    detect_pb2,
    edit_pb2,
    generate_pb2,
    identity_pb2,
    image_pb2,
    inpaint_pb2,
    job_spec_pb2,
    prompt_pb2,
    qwen_edit_pb2,
    segment_pb2,
    upscale_pb2,
)

UPSCALERS = {"": "LANCZOS (default)", "lanczos": "LANCZOS", "realesrgan": "Real-ESRGAN ×4"}


@dataclass(frozen=True)
class Field:
    """One form field: ``name`` is the SDK keyword (and, but for enums, the proto field)."""

    name: str
    label: str
    kind: str = "int"  # int, float, select, bool, text
    default: Any = None  # shown at first; None leaves the field empty (server default)
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    hint: str = ""


def _steps(default: str = "server default") -> Field:
    return Field("steps", "Steps", min=1, max=100, hint=f"1–100, empty: {default}")


SEED = Field("seed", "Seed", hint="empty: random; variant i uses seed + i")
VARIANTS = Field("variants", "Variants", default=1, min=1, max=8, hint="1–8")
UPSCALER = Field("upscaler", "Restore size with", kind="select", default="", options=UPSCALERS)


@dataclass(frozen=True)
class Mode:
    """A capability as the page offers it."""

    key: str  # the capability name (Job.capability, the JobSpec field)
    label: str
    method: str  # the AsyncClient method
    args: tuple[str, ...]  # positional arguments: "image", "mask", "control", "prompt" or a field name
    fields: tuple[Field, ...] = ()
    prompt: str = ""  # label of the prompt box; empty: the mode takes no prompt
    prompt_required: bool = True
    styles: bool = False
    image_prompt: bool = False
    # The input image slot's title; identity's image is the face photo, not a picture to change.
    image_label: str = "Input image"
    # The request field a pipeline step keeps the input image in, for a mode whose image is never
    # taken from the pipeline (identity's ``face``); empty: the step takes the pipeline's image.
    step_image: str = ""

    @property
    def needs_image(self) -> bool:
        return "image" in self.args

    @property
    def needs_mask(self) -> bool:
        return "mask" in self.args

    @property
    def needs_control(self) -> bool:
        return "control" in self.args


MODES: dict[str, Mode] = {
    m.key: m
    for m in [
        Mode(
            "generate", "Generate", "generate", ("prompt",), prompt="Prompt", styles=True, image_prompt=True,
            fields=(
                Field("width", "Width", min=16, max=2048, step=16, hint="multiple of 16, empty: 1024"),
                Field("height", "Height", min=16, max=2048, step=16, hint="multiple of 16, empty: 1024"),
                Field("steps", "Steps", default=4, min=1, max=100, hint="1–100 (schnell: 1–4)"),
                SEED, VARIANTS,
                Field("guidance", "Guidance", kind="float", min=0, max=20, step=0.5, hint="0–20, empty: 0"),
            ),
        ),
        Mode(
            "edit", "Edit (Kontext)", "edit", ("image", "prompt"), prompt="Instruction", styles=True,
            image_prompt=True,
            fields=(
                Field("guidance", "Guidance", kind="float", default=2.5, min=0, max=20, step=0.5, hint="0–20"),
                _steps(), SEED, VARIANTS, UPSCALER,
            ),
        ),
        Mode(
            "inpaint", "Inpaint", "inpaint", ("image", "mask", "prompt"), prompt="What to paint in the mask",
            fields=(
                Field("feather", "Feather", default=0, min=0, max=256, hint="0–256 px"),
                Field("guidance", "Guidance", kind="float", default=30.0, min=0, max=100, step=1, hint="0–100"),
                _steps(), SEED, VARIANTS, UPSCALER,
            ),
        ),
        Mode(
            "outpaint", "Outpaint", "outpaint", ("image", "prompt"), prompt="What to paint outside",
            prompt_required=False,
            fields=(
                *(Field(side, side.title(), default=0, min=0, max=2048, step=16, hint="0–2048 px")
                  for side in ("left", "right", "top", "bottom")),
                Field("feather", "Feather", default=0, min=0, max=256, hint="0–256 px"),
                Field("guidance", "Guidance", kind="float", default=30.0, min=0, max=100, step=1, hint="0–100"),
                _steps(), SEED, VARIANTS, UPSCALER,
            ),
        ),
        Mode(
            "qwen_edit", "Qwen edit", "qwen_edit", ("image", "prompt"), prompt="Instruction",
            fields=(
                Field("negative_prompt", "Negative prompt", kind="text"),
                Field("guidance", "True CFG", kind="float", default=4.0, min=1, max=20, step=0.5, hint="1–20"),
                _steps(), SEED, VARIANTS, UPSCALER,
            ),
        ),
        Mode(
            "control", "Control", "control", ("control", "prompt", "control_type"), prompt="Prompt",
            image_prompt=True,
            fields=(
                Field("control_type", "Control type", kind="select", default="canny",
                      options={"canny": "Canny edges", "depth": "Depth map", "pose": "OpenPose"}),
                Field("preprocess", "Make the edge map on the server (canny)", kind="bool", default=False),
                Field("control_scale", "Control scale", kind="float", default=0.7, min=0, max=1, step=0.05,
                      hint="0–1"),
                Field("width", "Width", min=16, max=2048, step=16, hint="empty: the control image's"),
                Field("height", "Height", min=16, max=2048, step=16, hint="empty: the control image's"),
                Field("guidance", "Guidance", kind="float", default=3.5, min=0, max=20, step=0.5, hint="0–20"),
                _steps(), SEED, VARIANTS, UPSCALER,
            ),
        ),
        Mode(
            "identity", "Identity (PuLID)", "identity", ("image", "prompt"), prompt="Prompt", styles=True,
            image_label="Face photo", step_image="face",
            fields=(
                Field("id_strength", "ID strength", kind="float", default=1.0, min=0, max=2, step=0.05,
                      hint="0–2 (0: plain FLUX.1-dev; 0.7–1.2 suggested)"),
                Field("start_step", "ID start step", default=0, min=0, max=99,
                      hint="0 to steps − 1; later: more editable"),
                Field("face_index", "Face", default=0, min=0, hint="0: the largest face, 1: the next…"),
                Field("guidance", "Guidance", kind="float", default=4.0, min=0, max=20, step=0.5, hint="0–20"),
                Field("true_cfg", "True CFG", kind="float", default=1.0, min=1, max=10, step=0.5,
                      hint="1–10; 1: off (above 1: twice the compute)"),
                Field("negative_prompt", "Negative prompt (true CFG > 1 only)", kind="text",
                      hint="empty: PuLID's default"),
                Field("width", "Width", min=16, max=2048, step=16, hint="multiple of 16, empty: 1024"),
                Field("height", "Height", min=16, max=2048, step=16, hint="multiple of 16, empty: 1024"),
                _steps("20"), SEED, VARIANTS,
            ),
        ),
        Mode(
            "upscale", "Upscale", "upscale", ("image",),
            fields=(
                Field("upscaler", "Upscaler", kind="select", default="realesrgan",
                      options={"realesrgan": "Real-ESRGAN ×4", "lanczos": "LANCZOS"}),
                Field("scale", "Scale", kind="float", default=4.0, min=1, max=4, step=0.5, hint="1–4"),
                Field("tile", "Tile", default=256, min=32, max=2048, step=32, hint="32–2048 px"),
                Field("overlap", "Overlap", default=16, min=0, max=512, hint="0 to tile/4"),
            ),
        ),
        Mode(
            "remove_background", "Remove background", "remove_background", ("image",),
            fields=(Field("return_mask", "Also return the mask", kind="bool", default=False),),
        ),
        Mode(
            "segment", "Segment", "segment", ("image", "text"),
            fields=(
                Field("text", "What to select", kind="text", hint="e.g. the sky"),
                Field("threshold", "Threshold", kind="float", default=0.4, min=0, max=1, step=0.05, hint="0–1"),
                Field("dilate", "Dilate", default=0, min=0, max=256, hint="0–256 px"),
                Field("feather", "Feather", default=0, min=0, max=256, hint="0–256 px"),
            ),
        ),
        Mode(
            "detect", "Detect (DETR)", "detect", ("image",),
            fields=(Field("threshold", "Threshold", kind="float", default=0.7, min=0, max=1, step=0.05,
                          hint="0–1"),),
        ),
        Mode(
            "ground", "Ground (OWLv2)", "ground", ("image", "queries"),
            fields=(
                Field("queries", "Find", kind="text", hint="comma-separated, e.g. the dragon, a sword"),
                Field("threshold", "Threshold", kind="float", default=0.1, min=0, max=1, step=0.05, hint="0–1"),
            ),
        ),
        Mode(
            "caption", "Caption", "caption", ("image",),
            fields=(
                Field("depth", "Captioner", kind="select", default="fast",
                      options={"fast": "Fast (BLIP-large)", "deep": "Deep (BLIP-2)"}),
                Field("max_tokens", "Max tokens", min=1, max=512, hint="1–512, empty: 40 fast / 120 deep"),
            ),
        ),
        Mode(
            "analyze", "Analyze", "analyze", ("image",),
            fields=(
                Field("depth", "Captioner", kind="select", default="fast",
                      options={"fast": "Fast (BLIP-large)", "deep": "Deep (BLIP-2)"}),
                Field("threshold", "Object threshold", kind="float", default=0.7, min=0, max=1, step=0.05,
                      hint="0–1"),
            ),
        ),
        Mode(
            "expand", "Expand prompt", "expand", ("prompt",), prompt="Short prompt",
            fields=(
                Field("seed", "Seed", default=0, hint="sampling seed"),
                Field("max_tokens", "Max tokens", default=160, min=1, max=512, hint="1–512"),
            ),
        ),
    ]
}

STYLE_MODES = tuple(m.label for m in MODES.values() if m.styles)


@dataclass
class Inputs:
    """The image slots and the prompt as the page holds them (asset names, or mask PNG bytes)."""

    prompt: str = ""
    image: str = ""
    mask: bytes | str | None = None
    control: str = ""
    image_prompt: str = ""
    image_prompt_weight: float | None = None
    styles: dict[str, float] = field(default_factory=dict)


def coerce(f: Field, value: Any) -> Any:
    """A form value as the SDK wants it; None (unset) for an empty field."""
    if value is None or value == "":
        return None if f.kind != "bool" else False
    if f.kind == "int":
        return int(value)
    if f.kind == "float":
        return float(value)
    if f.kind == "bool":
        return bool(value)
    return value


def missing_inputs(mode: Mode, inputs: Inputs) -> dict[str, str]:
    """Slot → message for the inputs a mode needs that are not there yet."""
    missing = {}
    if mode.needs_image and not inputs.image:
        what = "an input image" if mode.image_label == "Input image" else f"a {mode.image_label.lower()}"
        missing["image"] = f"Add {what} first (pick, drop or paste one)"
    # No mask: the server repaints the image's transparent pixels (a remove-bg cut-out), or says
    # under the mask slot that one is needed.
    if mode.needs_control and not inputs.control:
        missing["control_image"] = "Add a control image"
    if mode.prompt and mode.prompt_required and not inputs.prompt.strip():
        missing["prompt"] = "Write a prompt first"
    return missing


def call_arguments(mode: Mode, inputs: Inputs, values: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The positional and keyword arguments of the mode's SDK call."""
    kwargs = {f.name: coerce(f, values.get(f.name)) for f in mode.fields}
    slots = {"image": inputs.image, "mask": inputs.mask, "control": inputs.control, "prompt": inputs.prompt}
    args = []
    for name in mode.args:
        if name in slots:
            args.append(slots[name])
        else:
            value = kwargs.pop(name)
            args.append([q.strip() for q in (value or "").split(",") if q.strip()] if name == "queries" else value)
    if "preprocess" in kwargs:
        kwargs["preprocess"] = "canny" if kwargs["preprocess"] else None
    if "upscaler" in kwargs and not kwargs["upscaler"]:
        kwargs["upscaler"] = None
    if mode.styles and inputs.styles:
        kwargs["styles"] = dict(inputs.styles)
    if mode.image_prompt and inputs.image_prompt:
        kwargs["image_prompt"] = inputs.image_prompt
        kwargs["image_prompt_weight"] = inputs.image_prompt_weight
    return args, {k: v for k, v in kwargs.items() if v is not None}


def submit(client: paletta.AsyncClient, mode: Mode, inputs: Inputs, values: Mapping[str, Any]) -> Any:
    """The mode's job handle (submitted on first await)."""
    args, kwargs = call_arguments(mode, inputs, values)
    return getattr(client, mode.method)(*args, **kwargs)


# -- pipeline steps: the same form as a JobSpec --------------------------------------------------

_REQUESTS: dict[str, type[Message]] = {
    "generate": generate_pb2.GenerateRequest,
    "edit": edit_pb2.EditRequest,
    "inpaint": inpaint_pb2.InpaintRequest,
    "outpaint": inpaint_pb2.OutpaintRequest,
    "qwen_edit": qwen_edit_pb2.QwenEditServiceEditRequest,
    "control": control_pb2.ControlRequest,
    "identity": identity_pb2.IdentityServiceGenerateRequest,
    "upscale": upscale_pb2.UpscaleRequest,
    "remove_background": background_pb2.RemoveBackgroundRequest,
    "segment": segment_pb2.SegmentRequest,
    "detect": detect_pb2.DetectRequest,
    "ground": detect_pb2.GroundRequest,
    "caption": caption_pb2.CaptionRequest,
    "analyze": caption_pb2.AnalyzeRequest,
    "expand": prompt_pb2.ExpandRequest,
}
_ENUMS = {
    "upscaler": (image_pb2.Upscaler, "UPSCALER_"),
    "control_type": (control_pb2.ControlType, "CONTROL_TYPE_"),
    "depth": (caption_pb2.CaptionDepth, "CAPTION_DEPTH_"),
}


def step_spec(mode: Mode, inputs: Inputs, values: Mapping[str, Any]) -> job_spec_pb2.JobSpec:
    """The form as one pipeline step. Its image (and an inpaint step's mask) stay unset, so the step
    takes the pipeline's current image and mask; the IP-Adapter image, the control image and an
    identity step's face (never chained) are kept."""
    request = _REQUESTS[mode.key]()
    if mode.prompt:
        request.prompt = inputs.prompt  # type: ignore[attr-defined]
    for f in mode.fields:
        value = coerce(f, values.get(f.name))
        if value is None or value is False:
            continue
        if f.name in _ENUMS:
            if not value:
                continue
            enum, prefix = _ENUMS[f.name]
            value = enum.Value(prefix + str(value).upper())
        elif f.name == "preprocess":
            value = control_pb2.PREPROCESS_CANNY
        elif f.name == "queries":
            request.queries.extend(q.strip() for q in value.split(",") if q.strip())  # type: ignore[attr-defined]
            continue
        setattr(request, f.name, value)
    if mode.styles:
        request.styles.extend(  # type: ignore[attr-defined]
            image_pb2.StyleSelection(name=n, weight=w) for n, w in inputs.styles.items()
        )
    if mode.image_prompt and inputs.image_prompt:
        request.image_prompt.image.asset = inputs.image_prompt  # type: ignore[attr-defined]
        if inputs.image_prompt_weight is not None:
            request.image_prompt.weight = inputs.image_prompt_weight  # type: ignore[attr-defined]
    if mode.needs_control and inputs.control:
        request.control_image.asset = inputs.control  # type: ignore[attr-defined]
    if mode.step_image and inputs.image:
        getattr(request, mode.step_image).asset = inputs.image
    spec = job_spec_pb2.JobSpec()
    getattr(spec, mode.key).CopyFrom(request)
    return spec


def error_slot(field_path: str) -> str:
    """The page element a BadRequest field names: ``styles[0].weight`` → ``styles``,
    ``image_prompt.weight`` → ``image_prompt``, ``steps[1].inpaint.mask`` → ``pipeline``,
    identity's ``face`` → ``image`` (the face photo is the input image slot)."""
    if field_path.startswith("steps["):
        return "pipeline"
    root = field_path.split(".", 1)[0].split("[", 1)[0]
    return {"text": "text", "queries": "queries", "face": "image"}.get(root, root)
