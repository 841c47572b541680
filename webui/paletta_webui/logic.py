"""What the page shows, computed from SDK messages without any UI (unit-testable)."""

from __future__ import annotations

import base64
import io
import json
import time

from PIL import Image

from paletta.v1 import job_pb2, job_spec_pb2, system_service_pb2

ACTIVE_STATES = (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING)


def human_bytes(n: int) -> str:
    """Bytes for people: 512 B, 3.4 MiB, 12.50 GiB."""
    if n < 1024:
        return f"{n} B"
    if n < 1024**3:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024**3:.2f} GiB"


def data_url(data: bytes, mime: str = "image/png") -> str:
    """An inline ``data:`` URL for image bytes (live previews only; outputs go by URL)."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def decode_data_url(url: str) -> bytes:
    """The bytes of a ``data:…;base64,`` URL."""
    return base64.b64decode(url.split(",", 1)[1])


def jpeg_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=80)
    return data_url(buf.getvalue(), "image/jpeg")


def mask_is_empty(png: bytes) -> bool:
    """Whether a mask PNG has no painted (non-black) pixel."""
    return Image.open(io.BytesIO(png)).convert("L").getbbox() is None


def asset_url(asset: str) -> str:
    """The page's own URL of an asset ("assets/{sha}" → "/outputs/{sha}")."""
    return "/outputs/" + asset.removeprefix("assets/")


def state_label(state: int) -> str:
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]


def age(seconds: float) -> str:
    """"12 s", "4 min", "3 h", "2 d"."""
    seconds = max(seconds, 0)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def job_age(job: job_pb2.Job, now: float | None = None) -> str:
    return age((now or time.time()) - job.create_time.ToSeconds()) if job.HasField("create_time") else ""


def spec_summary(spec_holder: job_pb2.Job) -> str:
    """What a job was asked, from Job.spec: its prompt, text or queries, else its capability."""
    spec = spec_holder.spec
    kind = spec.WhichOneof("spec")
    if kind is None:
        return spec_holder.capability
    request = getattr(spec, kind)
    if kind == "pipeline":
        return " → ".join(step_summary(step) for step in request.steps)
    return _request_summary(kind, request)


def step_summary(step: job_spec_pb2.JobSpec) -> str:
    """One pipeline step: "generate: a knight", "upscale"."""
    kind = step.WhichOneof("spec") or ""
    summary = _request_summary(kind, getattr(step, kind))
    return kind if summary == kind else f"{kind}: {summary}"


def _request_summary(kind: str, request: object) -> str:
    for name in ("prompt", "text"):
        value = getattr(request, name, "")
        if value:
            return str(value)
    queries = getattr(request, "queries", None)
    if queries:
        return ", ".join(queries)
    if kind == "outpaint":
        r = request
        return f"+{r.left}/{r.right}/{r.top}/{r.bottom} px (left/right/top/bottom)"  # type: ignore[attr-defined]
    return kind


def output_step(output: job_pb2.JobOutput) -> tuple[int, str] | None:
    """(step, capability) of a pipeline output, read from its parameters; None elsewhere."""
    try:
        params = json.loads(output.parameters or "{}")
    except ValueError:
        return None
    if "step" not in params:
        return None
    return int(params["step"]), str(params.get("step_capability", ""))


def memory_fraction(status: system_service_pb2.GetStatusResponse) -> float:
    if status.memory_budget_bytes <= 0:
        return 0.0
    return min(status.memory_used_bytes / status.memory_budget_bytes, 1.0)


def status_rows(status: system_service_pb2.GetStatusResponse) -> list[tuple[str, str]]:
    """Label/value rows of the GPU panel: device, profile, memory, VRAM, queue."""
    rows = [
        ("Device", status.device or "?"),
        ("Profile", status.profile),
        ("Quantization", status.quantization or "—"),
        ("Models", f"{human_bytes(status.memory_used_bytes)} / {human_bytes(status.memory_budget_bytes)}"),
    ]
    if status.HasField("gpu"):
        gpu = status.gpu
        rows.append(("VRAM", f"{human_bytes(gpu.memory_used_bytes)} / {human_bytes(gpu.memory_total_bytes)}"))
        rows.append(("GPU", f"{gpu.utilization_percent}% · {gpu.power_watts:.0f} W · {gpu.temperature_celsius} °C"))
    rows.append(("Queue", f"{status.queue_length} waiting"))
    rows.append(("Running", status.running_job or "—"))
    if status.loading_model:
        rows.append(("Loading", status.loading_model))
    return rows
