"""The NiceGUI page, headless (NiceGUI's simulated User), against a fake SDK client."""

from __future__ import annotations

import io

from nicegui.testing.user_simulation import user_simulation
from PIL import Image

from paletta.v1 import image_pb2, job_pb2, system_service_pb2
from paletta_webui.logic import Generation, human_bytes, status_rows
from paletta_webui.page import make_root

JOB = "jobs/7"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _events() -> list[job_pb2.JobEvent]:
    out = job_pb2.JobOutput(index=0, seed=5, asset=image_pb2.Asset(name="assets/x", mime="image/png"))
    events = [
        job_pb2.JobEvent(queued=job_pb2.JobQueued(position=0)),
        job_pb2.JobEvent(progress=job_pb2.JobProgress(step=1, total_steps=4, stage="denoising")),
        job_pb2.JobEvent(preview=job_pb2.JobPreview(jpeg=b"\xff\xd8jpeg", step=1)),
        job_pb2.JobEvent(output=out),
        job_pb2.JobEvent(
            finished=job_pb2.JobFinished(job=job_pb2.Job(name=JOB, state=job_pb2.JOB_STATE_SUCCEEDED, outputs=[out]))
        ),
    ]
    for seq, event in enumerate(events, start=1):
        event.job, event.seq = JOB, seq
    return events


class FakeJob:
    def __init__(self, events: list[job_pb2.JobEvent]) -> None:
        self.events = events

    async def __aiter__(self):
        for event in self.events:
            yield event


class FakeClient:
    """Stands in for paletta.AsyncClient: the calls the page makes."""

    def __init__(self) -> None:
        self.generated: list[tuple[str, dict]] = []
        self.approved: list[tuple[str, int]] = []
        self.pipelines: list[list] = []

    async def status(self) -> system_service_pb2.GetStatusResponse:
        return system_service_pb2.GetStatusResponse(
            device="cuda:0 (NVIDIA H100)",
            profile="fast",
            quantization="nf4",
            memory_budget_bytes=70 * 1024**3,
            memory_used_bytes=12 * 1024**3,
            gpu=system_service_pb2.GpuStats(memory_total_bytes=80 * 1024**3, memory_used_bytes=20 * 1024**3),
        )

    async def generate(self, prompt: str, **kwargs) -> FakeJob:
        self.generated.append((prompt, kwargs))
        return FakeJob(_events())

    async def pipeline(self, script: str, **kwargs) -> FakeJob:
        from paletta.pipeline import parse

        self.pipelines.append(parse(script))
        return FakeJob(_events())

    async def download(self, name: str) -> bytes:
        return _png()

    async def approve_output(self, job: str, index: int) -> job_pb2.Job:
        self.approved.append((job, index))
        return job_pb2.Job(name=job)


def test_generation_state_follows_events():
    state = Generation()
    for event in _events()[:3]:
        state.apply(event)
    assert (state.job, state.progress, state.stage) == (JOB, 0.25, "denoising 1/4")
    assert state.preview_jpeg.startswith(b"\xff\xd8")
    for event in _events()[3:]:
        state.apply(event)
    assert state.progress == 1.0 and state.stage == "succeeded" and state.failed_message == ""
    assert [o.asset.name for o in state.outputs] == ["assets/x"]


def test_status_rows_show_device_profile_and_vram():
    rows = dict(status_rows(_status()))
    assert rows["Device"] == "cuda:0 (NVIDIA H100)"
    assert rows["Profile"] == "fast (nf4)"
    assert rows["VRAM"] == "20.00 GiB / 80.00 GiB"
    assert human_bytes(3 * 1024**2) == "3.0 MiB"


def _status() -> system_service_pb2.GetStatusResponse:
    return system_service_pb2.GetStatusResponse(
        device="cuda:0 (NVIDIA H100)",
        profile="fast",
        quantization="nf4",
        gpu=system_service_pb2.GpuStats(memory_total_bytes=80 * 1024**3, memory_used_bytes=20 * 1024**3),
    )


async def test_page_generates_shows_output_and_approves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # NiceGUI keeps its storage under the working directory
    fake = FakeClient()
    async with user_simulation(root=make_root(lambda: fake)) as user:
        await user.open("/")
        await user.should_see("Device: cuda:0 (NVIDIA H100)")
        await user.should_see("VRAM: 20.00 GiB / 80.00 GiB")
        user.find("Prompt").type("a knight")
        user.find("Generate").click()
        await user.should_see(f"{JOB} #0 · seed 5")
        await user.should_see(f"{JOB}: succeeded")
        user.find("Approve").click()
        await user.should_see("Approved ✓")
    assert fake.generated[0][0] == "a knight"
    assert fake.generated[0][1]["width"] == 1024 and fake.generated[0][1]["seed"] is None
    assert fake.approved == [(JOB, 0)]


async def test_pipeline_mode_sends_the_script_as_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = FakeClient()
    async with user_simulation(root=make_root(lambda: fake)) as user:
        await user.open("/")
        user.find("Prompt").type("[generate|tarot] a knight\n[auto_mask] the knight\n[inpaint] armor")
        user.find("Pipeline mode (one step per line)").click()
        user.find("Generate").click()
        await user.should_see(f"{JOB}: succeeded")
        user.find("Prompt").clear().type("[paint] a cat")
        user.find("Generate").click()
        await user.should_see("line 1: unknown mode 'paint'")
    assert not fake.generated
    assert [[s.WhichOneof("spec") for s in steps] for steps in fake.pipelines] == [["generate", "segment", "inpaint"]]

