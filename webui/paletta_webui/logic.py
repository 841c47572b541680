"""What the page shows, computed from SDK messages without any UI (unit-testable)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from paletta._common import human_bytes
from paletta.v1 import job_pb2, system_service_pb2


def data_url(data: bytes, mime: str = "image/png") -> str:
    """An inline ``data:`` URL for image bytes."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def status_rows(status: system_service_pb2.GetStatusResponse) -> list[tuple[str, str]]:
    """Label/value rows of the status panel: device, profile, memory, VRAM, queue, models."""
    rows = [
        ("Device", status.device or "?"),
        ("Profile", f"{status.profile} ({status.quantization})" if status.quantization else status.profile),
        ("Models", f"{human_bytes(status.memory_used_bytes)} of {human_bytes(status.memory_budget_bytes)}"),
    ]
    if status.HasField("gpu"):
        gpu = status.gpu
        rows.append(("VRAM", f"{human_bytes(gpu.memory_used_bytes)} / {human_bytes(gpu.memory_total_bytes)}"))
        rows.append(("GPU", f"{gpu.utilization_percent}% · {gpu.power_watts:.0f} W · {gpu.temperature_celsius} °C"))
    queue = f"{status.queue_length} waiting"
    if status.running_job:
        queue += f", running {status.running_job}"
    rows.append(("Queue", queue))
    if status.loaded_models:
        rows.append(("Loaded", ", ".join(m.key for m in status.loaded_models)))
    return rows


@dataclass
class Generation:
    """The state of one generation on the page, advanced by each JobEvent."""

    job: str = ""
    stage: str = "starting"
    progress: float = 0.0
    preview_jpeg: bytes = b""
    outputs: list[job_pb2.JobOutput] = field(default_factory=list)
    finished: job_pb2.Job | None = None

    @property
    def failed_message(self) -> str:
        """Why the job did not succeed, or empty."""
        if self.finished is None or self.finished.state == job_pb2.JOB_STATE_SUCCEEDED:
            return ""
        if self.finished.state == job_pb2.JOB_STATE_CANCELLED:
            return "cancelled"
        return self.finished.error.message or "failed"

    def apply(self, event: job_pb2.JobEvent) -> None:
        """Advance the state with one event."""
        self.job = event.job or self.job
        kind = event.WhichOneof("kind")
        if kind == "queued":
            self.stage = f"queued (position {event.queued.position})"
        elif kind == "started":
            self.stage = "started"
        elif kind == "progress":
            p = event.progress
            self.stage = f"{p.stage} {p.model}".strip() + f" {p.step}/{p.total_steps}"
            self.progress = p.step / p.total_steps if p.total_steps else 0.0
        elif kind == "preview":
            self.preview_jpeg = event.preview.jpeg
        elif kind == "output":
            self.outputs.append(event.output)
        elif kind == "finished":
            self.finished = event.finished.job
            self.progress = 1.0
            self.stage = job_pb2.JobState.Name(event.finished.job.state).removeprefix("JOB_STATE_").lower()
