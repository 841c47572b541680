"""The seed's pipeline script: one step per line, an optional ``[mode|style]`` prefix.

Example::

    [generate|tarot] knight in stormy mountain pass
    [auto_mask] the knight
    [inpaint] in obsidian cyborg armor with neon glow

Modes: generate, edit (alias kontext), qwen (alias qwen_edit), inpaint, auto_mask (alias
segment), upscale, remove_bg (alias remove_background). A line with no mode (or an empty one,
``[|tarot]``) is ``generate`` when nothing came before it and no starting image is given, else
``edit``. The style slot takes ``name`` or ``name:weight``; left empty, a generate or edit line
takes the default styles (``parse(..., styles=…)``, the CLI's ``--style``); the server refuses
styles on modes that don't support them. Each line becomes a
:class:`~paletta.v1.job_spec_pb2.JobSpec`; an ``auto_mask`` line is a ``segment`` step, whose
mask the next ``inpaint`` step takes.

Every other step, and every field of a step, can be given as JSON instead: a list of JobSpecs in
protobuf's JSON form (what ``paletta jobs get --json`` shows as ``spec.pipeline.steps``), e.g.
``[{"generate": {"prompt": "a harbour", "seed": 7}}, {"outpaint": {"prompt": "sea", "left": 128}},
{"control": {"prompt": "a tower", "controlType": "CONTROL_TYPE_CANNY"}}]``.
"""

from __future__ import annotations

import json
import re

from google.protobuf import json_format
from google.protobuf.message import Message

from paletta import _common as c
from paletta.v1 import (
    background_pb2,
    edit_pb2,
    generate_pb2,
    image_pb2,
    inpaint_pb2,
    job_spec_pb2,
    qwen_edit_pb2,
    segment_pb2,
    upscale_pb2,
)

_LINE = re.compile(r"^\s*(?:\[(?P<mode>[a-z_]*)\s*(?:\|\s*(?P<style>[^\]]*))?\])?\s*(?P<text>.*?)\s*$")
_ALIASES = {"kontext": "edit", "qwen_edit": "qwen", "remove_background": "remove_bg", "segment": "auto_mask"}
MODES = ("generate", "edit", "qwen", "inpaint", "auto_mask", "upscale", "remove_bg")

# JobSpec field of each capability request type, read from the oneof itself.
_SPEC_FIELDS = {
    f.message_type.full_name: f.name
    for f in job_spec_pb2.JobSpec.DESCRIPTOR.oneofs_by_name["spec"].fields
    if f.message_type is not None
}


STYLED_MODES = ("generate", "edit")  # the modes whose empty style slot takes the default styles


def parse(script: str, *, has_image: bool = False, styles: c.StylesInput = None) -> list[job_spec_pb2.JobSpec]:
    """Turn a pipeline script (or a JSON list of JobSpecs) into steps; raises ValueError naming the
    line or step of a mistake."""
    default = c.styles(styles)
    as_json = _json_steps(script)
    if as_json is not None:
        if default:
            raise ValueError("default styles apply to script lines; give each JSON step its own styles")
        return as_json
    steps: list[job_spec_pb2.JobSpec] = []
    for number, line in enumerate(script.splitlines(), start=1):
        if not line.strip():
            continue
        match = _LINE.match(line)
        assert match is not None  # the pattern matches any line
        mode = _ALIASES.get(match["mode"] or "", match["mode"] or "")
        if not mode:
            mode = "edit" if (steps or has_image) else "generate"
        if mode not in MODES:
            raise ValueError(f"line {number}: unknown mode {mode!r}; use one of {', '.join(MODES)}")
        slot = (match["style"] or "").strip()
        chosen = c.styles(slot) if slot else (default if mode in STYLED_MODES else [])
        steps.append(_step(mode, match["text"], chosen))
    if not steps:
        raise ValueError("the pipeline script has no steps")
    return steps


_JSON_STEPS = re.compile(r"\s*\[\s*(\{|\]\s*$)")  # "[{…" or "[]": no script line starts so


def _json_steps(text: str) -> list[job_spec_pb2.JobSpec] | None:
    """The steps of a JSON list of JobSpecs, or None when ``text`` is a script."""
    if not _JSON_STEPS.match(text):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"JSON steps, line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(data, list) or not data:
        raise ValueError("JSON steps are a non-empty list of JobSpecs, e.g. [{\"generate\": {\"prompt\": \"…\"}}]")
    steps = []
    for number, item in enumerate(data, start=1):
        try:
            steps.append(json_format.ParseDict(item, job_spec_pb2.JobSpec()))
        except json_format.ParseError as err:
            raise ValueError(f"step {number}: {err}") from None
    return steps


def to_spec(step: job_spec_pb2.JobSpec | Message) -> job_spec_pb2.JobSpec:
    """A JobSpec from a JobSpec or a capability request (``SegmentRequest`` → ``JobSpec(segment=…)``)."""
    if isinstance(step, job_spec_pb2.JobSpec):
        return step
    name = _SPEC_FIELDS.get(step.DESCRIPTOR.full_name)
    if name is None or name == "pipeline":
        raise TypeError(f"{type(step).__name__} is not a pipeline step")
    spec = job_spec_pb2.JobSpec()
    getattr(spec, name).CopyFrom(step)
    return spec


def _step(mode: str, text: str, styles: list[image_pb2.StyleSelection]) -> job_spec_pb2.JobSpec:
    spec = job_spec_pb2.JobSpec
    if mode == "generate":
        return spec(generate=generate_pb2.GenerateRequest(prompt=text, styles=styles))
    if mode == "edit":
        return spec(edit=edit_pb2.EditRequest(prompt=text, styles=styles))
    if mode == "qwen":
        return spec(qwen_edit=qwen_edit_pb2.QwenEditServiceEditRequest(prompt=text, styles=styles))
    if mode == "inpaint":
        return spec(inpaint=inpaint_pb2.InpaintRequest(prompt=text, styles=styles))
    if mode == "auto_mask":
        return spec(segment=segment_pb2.SegmentRequest(text=text))
    if mode == "upscale":
        return spec(upscale=upscale_pb2.UpscaleRequest())
    return spec(remove_background=background_pb2.RemoveBackgroundRequest())
