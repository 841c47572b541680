"""What the ``paletta`` command shows: progress for people, JSON lines for programs, output files.

Progress is drawn with rich only when stderr is a terminal; otherwise each change is one plain
line on stderr, so logs stay readable. ``--json`` replaces both with one JSON object per line on
stdout: ``{"event": "progress" | "output" | "finished" | "error", …}`` for jobs, or one document
for listings.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from paletta import _common as c
from paletta import results
from paletta.errors import InvalidArgument, PalettaError
from paletta.v1 import job_pb2

# The unit each stage counts in (Progress.step of Progress.total).
STAGE_UNITS = {"denoising": "steps", "tiling": "tiles", "inference": "steps", "pipeline": "pipeline steps"}


# -- output files ---------------------------------------------------------------------------------


def output_path(base: Path, index: int) -> Path:
    """out.png for output 0, out-1.png, out-2.png … for the others."""
    return base if index == 0 else base.with_name(f"{base.stem}-{index}{base.suffix}")


def check_output_path(path: Path) -> str | None:
    """Why ``path`` cannot be written (checked before any job is submitted), or None if it can."""
    if path.is_dir():
        return f"{path} is a directory; give a file name such as {path / 'out.png'}"
    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists():  # the folders write_output would create
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"directory {existing} is not writable"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    if path.suffix.lower() not in ("", ".png", ".jpg", ".jpeg", ".webp"):
        return f"unknown image suffix {path.suffix!r}: use .png, .jpg or .webp"
    return None


def write_output(data: bytes, path: Path) -> None:
    """Write an output; PNG bytes as they are (keeping the parameters chunk), other suffixes converted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in ("", ".png"):
        path.write_bytes(data)
        return
    image = c.decode_image(data)
    if path.suffix.lower() in (".jpg", ".jpeg") and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image.save(path)


# -- JSON -----------------------------------------------------------------------------------------


def message_dict(message: Message) -> dict[str, Any]:
    """A proto message as JSON-ready data, with the proto's snake_case field names."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def result_dict(result: results.Result) -> dict[str, Any]:
    """A typed job result as JSON-ready data, tagged with its type."""
    if isinstance(result, results.Detections):
        items = [
            {"label": d.label, "score": round(d.score, 4), "box": [d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max]}
            for d in result
        ]
        return {"type": "detections", "detections": items, "width": result.image_width, "height": result.image_height}
    if isinstance(result, results.Caption):
        return {"type": "caption", "text": result.text, "objects": result.objects}
    if isinstance(result, results.PromptExpansion):
        return {"type": "expansion", "original": result.original, "expanded": result.expanded}
    if isinstance(result, results.FaceIdentity):
        b = result.box
        return {"type": "face_identity", "box": [b.x_min, b.y_min, b.x_max, b.y_max], "score": round(result.score, 4),
                "face_index": result.face_index, "faces_found": result.faces_found, "face_crop": result.face_crop}
    return {"type": "segmentation", "mask": result.mask, "coverage": result.coverage}


def progress_dict(p: results.Progress) -> dict[str, Any]:
    data: dict[str, Any] = {"event": "queued" if p.stage == "queued" else "progress", "stage": p.stage}
    if p.stage == "queued":
        data["position"] = p.queue_position
        return data
    data.update(step=p.step, total=p.total, unit=STAGE_UNITS.get(p.stage, ""), variant=p.variant)
    if p.pipeline_step is not None:
        data["pipeline_step"] = p.pipeline_step
    if p.model:
        data["model"] = p.model
    return data


def error_dict(error: PalettaError, exit_code: int, hint: str = "") -> dict[str, Any]:
    data: dict[str, Any] = {
        "event": "error",
        "code": error.code.name,
        "message": hint or error.message,
        "reason": error.reason,
        "exit_code": exit_code,
    }
    if error.field_violations:
        data["field_violations"] = [{"field": v.field, "description": v.description} for v in error.field_violations]
    if error.retry_delay is not None:
        data["retry_delay"] = error.retry_delay
    job = getattr(error, "job", None)
    if job is not None:
        data["job"] = job.name
    return data


def emit_json(data: Any, file: IO[str] | None = None) -> None:
    """One JSON document on one line (stdout unless told)."""
    print(json.dumps(data, ensure_ascii=False), file=file or sys.stdout, flush=True)


# -- progress for people --------------------------------------------------------------------------


@dataclass
class JobContext:
    """What the CLI knows about the job it follows, to label progress ("variant 2/3", "step 2/4 segment")."""

    variants: int = 1
    pipeline_steps: list[str] = field(default_factory=list)


def describe_progress(p: results.Progress, context: JobContext) -> str:
    """A person's label for a progress update, e.g. "step 2/3 inpaint · variant 1/2 · denoising"."""
    parts: list[str] = []
    if p.pipeline_step is not None and context.pipeline_steps:
        total = len(context.pipeline_steps)
        if p.pipeline_step >= total:  # the pipeline's last progress: every step has run
            return f"{total}/{total} steps done"
        parts.append(f"step {p.pipeline_step + 1}/{total} {context.pipeline_steps[p.pipeline_step]}")
    if context.variants > 1 and p.stage not in ("queued", "pipeline"):
        parts.append(f"variant {min(p.variant + 1, context.variants)}/{context.variants}")
    if p.stage == "queued":
        parts.append(f"queued, position {p.queue_position}" if p.queue_position else "queued")
    elif p.stage in ("loading", "evicting"):
        parts.append(f"{p.stage} {p.model}".rstrip())
    elif p.stage != "pipeline":
        parts.append(p.stage)
    return " · ".join(parts)


def progress_line(p: results.Progress, context: JobContext) -> str:
    """The plain line printed for a progress update when stderr is not a terminal."""
    label = describe_progress(p, context)
    if p.total > 0 and p.stage not in ("queued", "loading", "evicting", "pipeline"):
        label += f" {p.step}/{p.total} {STAGE_UNITS.get(p.stage, 'steps')}"
    return label


class ProgressView:
    """Shows a job's progress on stderr: a rich bar on a terminal, plain lines otherwise, nothing if off."""

    def __init__(self, context: JobContext, *, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.context = context
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self.lines: list[str] = []  # the plain lines shown, for tests
        self._last = ""
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._label = ""

    def __enter__(self) -> ProgressView:
        if self.live:
            console = Console(file=self.stream)
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def update(self, p: results.Progress) -> None:
        if not self.enabled or p.preview is not None:
            return
        if self._bar is None:
            line = progress_line(p, self.context)
            if line != self._last:
                self._last = line
                self.lines.append(line)
                print(f"paletta: {line}", file=self.stream, flush=True)
            return
        label = describe_progress(p, self.context)
        counted = p.stage not in ("queued", "loading", "evicting")
        total = p.total if counted and p.total > 0 else None
        unit = STAGE_UNITS.get(p.stage, "") if total else ""
        if self._task is None or label != self._label:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(label, total=total, unit=unit)
            self._label = label
        self._bar.update(self._task, completed=p.step if total else 0, total=total, unit=unit)

    def note(self, text: str) -> None:
        """A line for people (e.g. a file written) that does not break the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=self.stream, flush=True)


# -- errors ---------------------------------------------------------------------------------------


def error_lines(error: PalettaError) -> list[str]:
    """What a person reads on stderr for an SDK error."""
    lines: list[str] = []
    if isinstance(error, InvalidArgument) and error.field_violations:
        lines.append("paletta: invalid request:")
        lines += [f"  {v.field}: {v.description}" for v in error.field_violations]
    elif error.field_violations:  # a job that failed on bad input
        lines.append(f"paletta: {error}")
        lines += [f"  {v.field}: {v.description}" for v in error.field_violations]
    else:
        lines.append(f"paletta: {error}")
    if error.retry_delay:
        lines.append(f"  retry in {error.retry_delay:g} s")
    return lines


def state_name(job: job_pb2.Job) -> str:
    return c.state_label(job.state)
