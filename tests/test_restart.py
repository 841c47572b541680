"""Crash safety: kill -9 the server mid-job; queued jobs run after restart, the running one
ends FAILED/INTERRUPTED, finished jobs and assets are intact."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from paletta.v1 import generate_pb2 as gen
from paletta.v1 import generate_service_pb2_grpc as gen_grpc
from paletta.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from tests.conftest import link_tiny_models
from tests.helpers import collect, download

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PALETTA_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "paletta_server.main", str(data)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_serving(address: str, timeout: float = 60) -> grpc.aio.Channel:
    channel = grpc.aio.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(int(timeout * 10)):
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return channel
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("server did not become healthy")


async def test_kill_9_then_restart(tmp_path, tiny_models_dir):
    data = tmp_path / "data"
    link_tiny_models(data, tiny_models_dir)
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = start_server(data, port)
    try:
        channel = await wait_serving(address)
        gen_stub = gen_grpc.GenerateServiceStub(channel)
        kept = gen.GenerateRequest(prompt="kept", width=64, height=64, steps=1, seed=1)
        done = await collect(gen_stub.Generate(kept))
        kept_asset = next(e.output.asset.name for e in done if e.HasField("output"))
        kept_bytes = await download(channel, kept_asset)
        running = gen_stub.Generate(gen.GenerateRequest(prompt="cut", width=256, height=256, steps=100, seed=2))
        while not (event := await running.read()).HasField("progress") or event.progress.stage != "denoising":
            pass
        running_name = event.job
        queued_names = []
        for i in range(2):
            stream = gen_stub.Generate(gen.GenerateRequest(prompt=f"q{i}", width=64, height=64, steps=1, seed=i))
            queued_names.append((await stream.read()).job)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        await channel.close()

        proc = start_server(data, port)
        channel = await wait_serving(address)
        jobs = job_service_pb2_grpc.JobServiceStub(channel)
        interrupted = await jobs.GetJob(job_service_pb2.GetJobRequest(name=running_name))
        assert interrupted.state == job_pb2.JOB_STATE_FAILED
        assert interrupted.error.code == grpc.StatusCode.ABORTED.value[0]
        info = error_details_pb2.ErrorInfo()
        assert interrupted.error.details[0].Unpack(info) and info.reason == "INTERRUPTED"
        for name in queued_names:
            events = await collect(jobs.WatchJob(job_service_pb2.WatchJobRequest(name=name)))
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            assert events[0].HasField("queued") and events[1].HasField("queued")  # before and after the restart
            assert events[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED
        assert await download(channel, kept_asset) == kept_bytes
        await channel.close()
    finally:
        proc.kill()
        proc.wait(10)
