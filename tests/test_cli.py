"""The ``paletta`` command against a small scripted gRPC server (sync grpc, no models)."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image, PngImagePlugin

from paletta import cli
from paletta.v1 import (
    asset_service_pb2,
    asset_service_pb2_grpc,
    generate_service_pb2_grpc,
    image_pb2,
    job_options_pb2,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    system_service_pb2,
    system_service_pb2_grpc,
)

JOB = "jobs/abc"


def png_with_parameters(size: tuple[int, int], seed: int) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps({"seed": seed}))
    buf = io.BytesIO()
    Image.new("RGB", size, (seed, 0, 0)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


ASSETS = {"assets/one": png_with_parameters((32, 16), 5), "assets/two": png_with_parameters((32, 16), 6)}


class FakePaletta(
    generate_service_pb2_grpc.GenerateServiceServicer,
    asset_service_pb2_grpc.AssetServiceServicer,
    job_service_pb2_grpc.JobServiceServicer,
    system_service_pb2_grpc.SystemServiceServicer,
):
    """Scripted answers: a two-variant generate, downloads, jobs and status."""

    def __init__(self) -> None:
        self.requests: list = []
        self.metadata: list[dict[str, str]] = []

    def _events(self, variants: int) -> list[job_pb2.JobEvent]:
        outputs = [
            job_pb2.JobOutput(index=i, seed=5 + i, asset=image_pb2.Asset(name=name, width=32, height=16))
            for i, name in enumerate(list(ASSETS)[:variants])
        ]
        events: list[job_pb2.JobEvent] = [job_pb2.JobEvent(queued=job_pb2.JobQueued(position=0))]
        for output in outputs:
            events += [
                job_pb2.JobEvent(progress=job_pb2.JobProgress(step=s, total_steps=2, stage="denoising")) for s in (1, 2)
            ]
            events.append(job_pb2.JobEvent(output=output))
        job = job_pb2.Job(name=JOB, capability="generate", state=job_pb2.JOB_STATE_SUCCEEDED, outputs=outputs)
        events.append(job_pb2.JobEvent(finished=job_pb2.JobFinished(job=job)))
        for seq, ev in enumerate(events, start=1):
            ev.job, ev.seq = JOB, seq
        return events

    def Generate(self, request, context):  # noqa: N802 - gRPC method name
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if request.width % 16:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field="width", description="not a multiple of 16")
                ]
            )
            detail = any_pb2.Any()
            detail.Pack(bad)
            status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="bad width", details=[detail])
            context.abort_with_status(rpc_status.to_status(status))
        yield from self._events(request.variants or 1)

    def DownloadAsset(self, request, context):  # noqa: N802
        data = ASSETS[request.name]
        yield asset_service_pb2.AssetChunk(data=data[:100])
        yield asset_service_pb2.AssetChunk(data=data[100:])

    def ListJobs(self, request, context):  # noqa: N802
        self.requests.append(request)
        job = job_pb2.Job(name=JOB, capability="generate", state=job_pb2.JOB_STATE_RUNNING)
        return job_service_pb2.ListJobsResponse(jobs=[job])

    def CancelJob(self, request, context):  # noqa: N802
        self.requests.append(request)
        return job_pb2.Job(name=request.name, state=job_pb2.JOB_STATE_CANCELLED)

    def WatchJob(self, request, context):  # noqa: N802
        self.requests.append(request)
        yield from (e for e in self._events(1) if e.seq > request.after_seq)

    def GetStatus(self, request, context):  # noqa: N802
        return system_service_pb2.GetStatusResponse(
            device="cpu",
            profile="tiny",
            quantization="fp32",
            version="0.1.0",
            memory_budget_bytes=16 * 1024**3,
            memory_used_bytes=3 * 1024**2,
            queue_length=2,
            loaded_models=[system_service_pb2.ModelInfo(key="flux-schnell", bytes=3 * 1024**2, resident=True)],
        )


@pytest.fixture
def fake():
    servicer = FakePaletta()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    generate_service_pb2_grpc.add_GenerateServiceServicer_to_server(servicer, server)
    asset_service_pb2_grpc.add_AssetServiceServicer_to_server(servicer, server)
    job_service_pb2_grpc.add_JobServiceServicer_to_server(servicer, server)
    system_service_pb2_grpc.add_SystemServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    server.stop(0)


def test_generate_writes_one_file_per_variant_with_png_bytes_intact(fake, tmp_path, capsys):
    out = tmp_path / "out.png"
    argv = ["--address", fake.address, "--token", "tok", "generate", "a knight", "-o", str(out)]
    argv += ["--width", "64", "--height", "32", "--steps", "2", "--seed", "5", "--variants", "2"]
    argv += ["--style", "tarot:0.8", "--style", "anime", "--priority", "high"]
    assert cli.main(argv) == 0

    request = fake.requests[0]
    assert (request.prompt, request.width, request.height, request.steps, request.seed) == (
        "a knight",
        64,
        32,
        2,
        5,
    )
    assert request.variants == 2 and request.options.priority == job_options_pb2.PRIORITY_HIGH
    assert [(s.name, round(s.weight, 2)) for s in request.styles] == [("tarot", 0.8), ("anime", 0.0)]
    assert not request.styles[1].HasField("weight")
    assert fake.metadata[0]["authorization"] == "Bearer tok"
    assert out.read_bytes() == ASSETS["assets/one"]  # parameters chunk kept
    assert (tmp_path / "out-1.png").read_bytes() == ASSETS["assets/two"]
    assert capsys.readouterr().out.split() == [str(out), str(tmp_path / "out-1.png")]


def test_global_options_also_work_after_the_command_and_from_env(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("PALETTA_TOKEN", "from-env")
    out = tmp_path / "k.jpg"
    assert cli.main(["generate", "a knight", "-o", str(out), "--no-progress", "--address", fake.address]) == 0
    assert fake.metadata[0]["authorization"] == "Bearer from-env"
    assert Image.open(out).format == "JPEG"


def test_progress_bar_follows_stages_and_restarts_per_variant():
    bar = cli.ProgressBar(enabled=False)
    totals = []
    for step in (1, 2, 1, 2):
        bar.feed(job_pb2.JobEvent(progress=job_pb2.JobProgress(step=step, total_steps=2, stage="denoising")))
        totals.append((bar.bar.n, bar.bar.total))
    first = bar.bar
    bar.feed(job_pb2.JobEvent(progress=job_pb2.JobProgress(step=0, total_steps=1, stage="loading", model="x")))
    assert totals == [(1, 2), (2, 2), (1, 2), (2, 2)]
    assert bar.stage == "loading x" and bar.bar is not first and bar.updates == 5
    bar.close()


def test_invalid_argument_prints_field_violations_and_exits_1(fake, tmp_path, capsys):
    code = cli.main(["--address", fake.address, "generate", "x", "-o", str(tmp_path / "o.png"), "--width", "17"])
    assert code == 1
    err = capsys.readouterr().err
    assert "width: not a multiple of 16" in err
    assert not (tmp_path / "o.png").exists()


def test_unreachable_server_exits_1_with_message(tmp_path, capsys):
    assert cli.main(["--address", "127.0.0.1:1", "status"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_jobs_list_watch_cancel_and_status(fake, capsys):
    assert cli.main(["--address", fake.address, "jobs", "list", "--state", "running", "--limit", "5"]) == 0
    listed = capsys.readouterr().out
    assert JOB in listed and "running" in listed
    assert list(fake.requests[-1].states) == [job_pb2.JOB_STATE_RUNNING] and fake.requests[-1].page_size == 5

    assert cli.main(["--address", fake.address, "jobs", "watch", JOB, "--after-seq", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert fake.requests[-1].after_seq == 2
    assert [line.split()[0] for line in lines] == ["3", "4", "5"]
    assert lines[-1].split()[1:] == ["finished", "succeeded"]

    assert cli.main(["--address", fake.address, "jobs", "cancel", JOB]) == 0
    assert capsys.readouterr().out.strip() == f"{JOB} cancelled"

    assert cli.main(["--address", fake.address, "status"]) == 0
    status = capsys.readouterr().out
    assert "device:       cpu" in status and "tiny (fp32)" in status and "2 waiting" in status
    assert "flux-schnell 3.0 MiB" in status


def test_output_path_numbering():
    assert cli.output_path(Path("out.png"), 0) == Path("out.png")
    assert cli.output_path(Path("dir/out.png"), 2) == Path("dir/out-2.png")


def test_serve_builds_config_from_flags_without_importing_torch(tmp_path):
    script = (
        "import sys\n"
        "import paletta_server.main as m\n"
        "m.serve = lambda c: print(c.host, c.port, c.profile, c.token, c.tls_cert, c.data_dir)\n"
        "from paletta import cli\n"
        "code = cli.main(sys.argv[1:])\n"
        "print('torch' in sys.modules, code)\n"
    )
    argv = ["serve", "--host", "0.0.0.0", "--port", "6000", "--profile", "tiny", "--token", "t0k"]
    argv += ["--data-dir", str(tmp_path), "--tls-cert", "c.pem", "--tls-key", "k.pem"]
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"0.0.0.0 6000 tiny t0k c.pem {tmp_path}", "False 0"]


# -- end to end against the real server fixture (tests/conftest.py) ---------------------------


@pytest.mark.slow
async def test_cli_generate_end_to_end_on_tiny_server(server, tmp_path):
    out = tmp_path / "knight.png"
    argv = ["--address", server.address, "generate", "a knight", "-o", str(out)]
    argv += [
        "--width",
        "64",
        "--height",
        "48",
        "--steps",
        "2",
        "--seed",
        "3",
        "--variants",
        "2",
        "--no-progress",
    ]
    assert await asyncio.to_thread(cli.main, argv) == 0
    first, second = Image.open(out), Image.open(tmp_path / "knight-1.png")
    assert first.size == second.size == (64, 48)
    assert json.loads(first.text["parameters"])["seed"] == 3
    assert json.loads(second.text["parameters"])["seed"] == 4
