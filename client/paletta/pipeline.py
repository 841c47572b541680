"""The seed's pipeline script: one step per line, an optional ``[mode|style]`` prefix.

Example::

    [generate|tarot] knight in stormy mountain pass
    [auto_mask] the knight
    [inpaint] in obsidian cyborg armor with neon glow

Modes: generate, edit (alias kontext), qwen (alias qwen_edit), inpaint, auto_mask, upscale,
remove_bg. A line with no mode (or an empty one, ``[|tarot]``) is ``generate`` when nothing came
before it and no starting image is given, else ``edit``. The style slot takes ``name`` or
``name:weight``; the server refuses styles on modes that don't support them.
"""

from __future__ import annotations

import re

from paletta import _common as c
from paletta.v1 import (
    background_service_pb2,
    edit_service_pb2,
    generate_service_pb2,
    inpaint_service_pb2,
    pipeline_service_pb2,
    qwen_edit_service_pb2,
    segment_service_pb2,
    upscale_service_pb2,
)

_LINE = re.compile(r"^\s*(?:\[(?P<mode>[a-z_]*)\s*(?:\|\s*(?P<style>[^\]]*))?\])?\s*(?P<text>.*?)\s*$")
_ALIASES = {"kontext": "edit", "qwen_edit": "qwen", "remove_background": "remove_bg"}
MODES = ("generate", "edit", "qwen", "inpaint", "auto_mask", "upscale", "remove_bg")


def parse(script: str, *, has_image: bool = False) -> list[pipeline_service_pb2.PipelineStep]:
    """Turn a pipeline script into steps; raises ValueError naming the line of a mistake."""
    steps: list[pipeline_service_pb2.PipelineStep] = []
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
        styles = c.styles(match["style"].strip()) if match["style"] and match["style"].strip() else []
        steps.append(_step(mode, match["text"], styles))
    if not steps:
        raise ValueError("the pipeline script has no steps")
    return steps


def _step(mode: str, text: str, styles: list) -> pipeline_service_pb2.PipelineStep:
    step = pipeline_service_pb2.PipelineStep
    if mode == "generate":
        return step(generate=generate_service_pb2.GenerateRequest(prompt=text, styles=styles))
    if mode == "edit":
        return step(edit=edit_service_pb2.EditRequest(prompt=text, styles=styles))
    if mode == "qwen":
        return step(qwen_edit=qwen_edit_service_pb2.QwenEditServiceEditRequest(prompt=text, styles=styles))
    if mode == "inpaint":
        return step(inpaint=inpaint_service_pb2.InpaintRequest(prompt=text, styles=styles))
    if mode == "auto_mask":
        return step(auto_mask=segment_service_pb2.SegmentRequest(text=text))
    if mode == "upscale":
        return step(upscale=upscale_service_pb2.UpscaleRequest())
    return step(remove_background=background_service_pb2.RemoveBackgroundRequest())
