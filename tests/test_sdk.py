"""The sync SDK against scripted server responses (grpcio-testing channel), plus the async handle
against a small in-process grpc.aio servicer."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import grpc_testing
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from PIL import Image

import paletta
from paletta import _common
from paletta.v1 import (
    asset_service_pb2,
    edit_service_pb2,
    generate_service_pb2,
    generate_service_pb2_grpc,
    image_pb2,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)

SERVICES = [
    generate_service_pb2.DESCRIPTOR.services_by_name["GenerateService"],
    edit_service_pb2.DESCRIPTOR.services_by_name["EditService"],
    job_service_pb2.DESCRIPTOR.services_by_name["JobService"],
    asset_service_pb2.DESCRIPTOR.services_by_name["AssetService"],
]
GENERATE = SERVICES[0].methods_by_name["Generate"]
EDIT = SERVICES[1].methods_by_name["Edit"]
WATCH = SERVICES[2].methods_by_name["WatchJob"]
GET_JOB = SERVICES[2].methods_by_name["GetJob"]
LIST_JOBS = SERVICES[2].methods_by_name["ListJobs"]
CANCEL = SERVICES[2].methods_by_name["CancelJob"]
UPLOAD = SERVICES[3].methods_by_name["UploadAsset"]
DOWNLOAD = SERVICES[3].methods_by_name["DownloadAsset"]
OK = grpc.StatusCode.OK
JOB = "jobs/7"


# -- scripting helpers -----------------------------------------------------------------------


def event(seq: int, **kind: Any) -> job_pb2.JobEvent:
    return job_pb2.JobEvent(job=JOB, seq=seq, **kind)


def progress(seq: int, step: int, total: int = 4) -> job_pb2.JobEvent:
    return event(seq, progress=job_pb2.JobProgress(step=step, total_steps=total, stage="denoising"))


def output(index: int, name: str = "", **kwargs: Any) -> job_pb2.JobOutput:
    asset = image_pb2.Asset(name=name, mime="image/png") if name else None
    return job_pb2.JobOutput(index=index, asset=asset, seed=100 + index, **kwargs)


def finished(seq: int, state: int = job_pb2.JOB_STATE_SUCCEEDED, outputs=(), error=None) -> job_pb2.JobEvent:
    job = job_pb2.Job(name=JOB, capability="generate", state=state, outputs=list(outputs), last_seq=seq, error=error)
    return event(seq, finished=job_pb2.JobFinished(job=job))


def rich_status(code: int, message: str, *details) -> status_pb2.Status:
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(code=code, message=message, details=packed)


def trailing(status: status_pb2.Status) -> tuple[tuple[str, bytes], ...]:
    return (("grpc-status-details-bin", status.SerializeToString()),)


def png(size: tuple[int, int], color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def channel():
    return grpc_testing.channel(SERVICES, grpc_testing.strict_real_time())


@pytest.fixture
def client(channel) -> Iterator[paletta.Client]:
    yield paletta.Client(channel=channel, token="s3cret", reconnect_timeout=5)


@pytest.fixture
def background() -> Iterator[Callable[[Callable[[], Any]], Future]]:
    """Run the client side in a thread while the test plays the server."""
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool.submit
    pool.shutdown(wait=False, cancel_futures=True)


# -- events and final job --------------------------------------------------------------------


def test_generate_sends_typed_request_with_token_and_iterates_events(client, channel, background):
    def run():
        job = client.generate("a knight", width=512, height=256, seed=7, variants=2, styles=["tarot:0.8", "anime"])
        return job.name, [e.WhichOneof("kind") for e in job], job.wait()

    future = background(run)
    metadata, request, rpc = channel.take_unary_stream(GENERATE)
    for ev in [
        event(1, queued=job_pb2.JobQueued(position=0)),
        event(2, started=job_pb2.JobStarted()),
        progress(3, 1),
        event(4, preview=job_pb2.JobPreview(jpeg=b"jpg", step=1)),
        finished(5, outputs=[output(0, "assets/a"), output(1, "assets/b")]),
    ]:
        rpc.send_response(ev)
    rpc.terminate((), OK, "")
    name, kinds, final = future.result(timeout=5)

    assert ("authorization", "Bearer s3cret") in metadata
    assert request.prompt == "a knight" and (request.width, request.height) == (512, 256)
    assert request.HasField("seed") and request.seed == 7 and request.variants == 2
    assert [(s.name, s.HasField("weight")) for s in request.styles] == [("tarot", True), ("anime", False)]
    assert request.styles[0].weight == pytest.approx(0.8)
    assert name == JOB
    assert kinds == ["queued", "started", "progress", "preview", "finished"]
    assert final.state == job_pb2.JOB_STATE_SUCCEEDED
    assert [o.asset.name for o in final.outputs] == ["assets/a", "assets/b"]


def test_unset_seed_stays_unset(client, channel, background):
    future = background(lambda: client.generate("x").name)
    _, request, rpc = channel.take_unary_stream(GENERATE)
    rpc.send_response(event(1, queued=job_pb2.JobQueued()))
    assert future.result(timeout=5) == JOB
    assert not request.HasField("seed") and not request.HasField("guidance")
    rpc.terminate((), OK, "")


def test_images_downloads_each_output_through_asset_service(client, channel, background):
    def run():
        return [image.size for image in client.generate("a knight", variants=2).images()]

    future = background(run)
    _, _, rpc = channel.take_unary_stream(GENERATE)
    rpc.send_response(event(1, queued=job_pb2.JobQueued()))
    rpc.send_response(event(2, output=output(0, "assets/first")))
    rpc.send_response(event(3, output=output(1, "assets/second")))
    rpc.send_response(finished(4, outputs=[output(0, "assets/first"), output(1, "assets/second")]))
    rpc.terminate((), OK, "")
    for expected_name, size in [("assets/first", (32, 16)), ("assets/second", (8, 24))]:
        _, request, download = channel.take_unary_stream(DOWNLOAD)
        assert request.name == expected_name
        data = png(size)
        half = len(data) // 2
        download.send_response(asset_service_pb2.AssetChunk(data=data[:half]))
        download.send_response(asset_service_pb2.AssetChunk(data=data[half:]))
        download.terminate((), OK, "")
    assert future.result(timeout=5) == [(32, 16), (8, 24)]


def test_image_inputs_are_uploaded_in_256_kib_chunks_and_passed_as_asset_refs(client, channel, background):
    data = bytes(range(256)) * 2400  # 600 KiB → chunks of 256, 256 and 88 KiB

    future = background(lambda: client.edit(data, "make it gold", image_prompt="assets/ref", image_prompt_weight=0.5))
    _, upload = channel.take_stream_unary(UPLOAD)
    chunks = [upload.take_request() for _ in range(3)]
    upload.requests_closed()
    upload.terminate(image_pb2.Asset(name="assets/up", width=10, height=10), (), OK, "")
    _, request, rpc = channel.take_unary_stream(EDIT)
    rpc.send_response(event(1, queued=job_pb2.JobQueued()))
    future.result(timeout=5)
    rpc.terminate((), OK, "")

    assert [len(c.data) for c in chunks] == [256 * 1024, 256 * 1024, len(data) - 512 * 1024]
    assert b"".join(c.data for c in chunks) == data
    assert request.image.asset == "assets/up"
    assert request.image_prompt.image.asset == "assets/ref"  # asset names are never re-uploaded
    assert request.image_prompt.weight == pytest.approx(0.5)


def test_prepare_image_accepts_paths_pil_images_and_asset_names(tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(png((4, 4)))
    assert _common.prepare_image(path).data == path.read_bytes()
    assert _common.prepare_image(str(path)).data == path.read_bytes()
    assert _common.prepare_image("assets/abc").asset == "assets/abc"
    decoded = Image.open(io.BytesIO(_common.prepare_image(Image.new("L", (3, 5))).data))
    assert decoded.size == (3, 5)
    with pytest.raises(TypeError):
        _common.prepare_image(42)  # type: ignore[arg-type]


def test_style_and_enum_coercion():
    assert [(s.name, s.weight) for s in _common.styles({"tarot": 1.5})] == [("tarot", 1.5)]
    assert _common.parse_style(("koda", 0.3)).weight == pytest.approx(0.3)
    assert _common.priority("high") == image_pb2.PRIORITY_HIGH
    assert _common.upscaler("REALESRGAN") == image_pb2.UPSCALER_REALESRGAN
    assert _common.job_state("running") == job_pb2.JOB_STATE_RUNNING
    with pytest.raises(ValueError, match="choose one of low, normal, high"):
        _common.priority("urgent")
    with pytest.raises(ValueError, match="not a number"):
        _common.parse_style("tarot:heavy")


# -- errors ----------------------------------------------------------------------------------


def test_invalid_argument_becomes_error_with_field_violations(client, channel, background):
    future = background(lambda: client.generate("", width=17))
    _, _, rpc = channel.take_unary_stream(GENERATE)
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="prompt", description="must not be empty"),
            error_details_pb2.BadRequest.FieldViolation(field="width", description="must be a multiple of 16"),
        ]
    )
    info = error_details_pb2.ErrorInfo(reason="INVALID_ARGUMENT", domain="paletta")
    status = rich_status(code_pb2.INVALID_ARGUMENT, "bad request", bad, info)
    rpc.terminate(trailing(status), grpc.StatusCode.INVALID_ARGUMENT, "bad request")

    with pytest.raises(paletta.InvalidArgument) as caught:
        future.result(timeout=5)
    err = caught.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.field_violations == [
        paletta.FieldViolation("prompt", "must not be empty"),
        paletta.FieldViolation("width", "must be a multiple of 16"),
    ]
    assert "width: must be a multiple of 16" in str(err)
    assert isinstance(err.__cause__, grpc.RpcError)


def test_resource_exhausted_carries_retry_delay_and_reason(client, channel, background):
    future = background(lambda: client.generate("a knight"))
    _, _, rpc = channel.take_unary_stream(GENERATE)
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000))
    info = error_details_pb2.ErrorInfo(reason="QUEUE_FULL", domain="paletta", metadata={"max_queue": "64"})
    status = rich_status(code_pb2.RESOURCE_EXHAUSTED, "queue full", retry, info)
    rpc.terminate(trailing(status), grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")

    with pytest.raises(paletta.ResourceExhausted) as caught:
        future.result(timeout=5)
    assert caught.value.retry_delay == pytest.approx(2.5)
    assert caught.value.reason == "QUEUE_FULL"
    assert caught.value.metadata == {"max_queue": "64"}


def test_not_found_without_rich_details(client, channel, background):
    future = background(lambda: client.get_job("jobs/missing"))
    _, request, rpc = channel.take_unary_unary(GET_JOB)
    rpc.terminate(None, (), grpc.StatusCode.NOT_FOUND, "no job jobs/missing")
    with pytest.raises(paletta.NotFound, match="no job jobs/missing"):
        future.result(timeout=5)
    assert request.name == "jobs/missing"


def test_failed_job_raises_job_failed_with_code_and_reason(client, channel, background):
    future = background(lambda: client.generate("a knight").wait())
    _, _, rpc = channel.take_unary_stream(GENERATE)
    info = error_details_pb2.ErrorInfo(reason="MODEL_UNAVAILABLE", domain="paletta")
    error = rich_status(code_pb2.FAILED_PRECONDITION, "flux-schnell is missing", info)
    rpc.send_response(event(1, queued=job_pb2.JobQueued()))
    rpc.send_response(finished(2, state=job_pb2.JOB_STATE_FAILED, error=error))
    rpc.terminate((), OK, "")  # the stream itself ends OK: the error is in the job

    with pytest.raises(paletta.JobFailed) as caught:
        future.result(timeout=5)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.reason == "MODEL_UNAVAILABLE"
    assert caught.value.job.state == job_pb2.JOB_STATE_FAILED
    assert "flux-schnell is missing" in str(caught.value)


def test_cancelled_job_raises_job_cancelled_and_cancel_calls_cancel_job(client, channel, background):
    job_future = background(lambda: client.generate("a knight"))
    _, _, rpc = channel.take_unary_stream(GENERATE)
    rpc.send_response(event(1, queued=job_pb2.JobQueued()))
    handle = job_future.result(timeout=5)

    cancel_pool = ThreadPoolExecutor(max_workers=1)
    cancelled = cancel_pool.submit(handle.cancel)
    _, cancel_request, cancel_rpc = channel.take_unary_unary(CANCEL)
    cancel_rpc.terminate(job_pb2.Job(name=JOB, state=job_pb2.JOB_STATE_RUNNING), (), OK, "")
    assert cancel_request.name == JOB
    assert cancelled.result(timeout=5).name == JOB
    cancel_pool.shutdown()

    wait_future = background(handle.wait)
    rpc.send_response(finished(2, state=job_pb2.JOB_STATE_CANCELLED))
    rpc.terminate((), OK, "")
    with pytest.raises(paletta.JobCancelled):
        wait_future.result(timeout=5)


# -- re-attach -------------------------------------------------------------------------------


def test_dropped_stream_reattaches_with_after_seq_of_last_seen_event(client, channel, background):
    seen_two = threading.Event()

    def run():
        job = client.generate("a knight")
        seqs = []
        for ev in job:
            seqs.append(ev.seq)
            if ev.seq == 2:
                seen_two.set()
        return seqs, job.wait(), job.reattach_count

    future = background(run)
    _, _, rpc = channel.take_unary_stream(GENERATE)
    rpc.send_response(event(1, queued=job_pb2.JobQueued()))
    rpc.send_response(event(2, started=job_pb2.JobStarted()))
    assert seen_two.wait(5)
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "connection reset")

    metadata, watch_request, watch = channel.take_unary_stream(WATCH)
    assert (watch_request.job, watch_request.after_seq) == (JOB, 2)
    assert ("authorization", "Bearer s3cret") in metadata
    watch.send_response(event(2, started=job_pb2.JobStarted()))  # a replayed duplicate is dropped
    watch.send_response(progress(3, 1))
    watch.send_response(finished(4, outputs=[output(0, "assets/a")]))
    watch.terminate((), OK, "")

    seqs, final, reattached = future.result(timeout=5)
    assert seqs == [1, 2, 3, 4]
    assert final.state == job_pb2.JOB_STATE_SUCCEEDED
    assert reattached == 1


def test_attach_to_finished_job_whose_watch_has_nothing_left_uses_get_job(client, channel, background):
    future = background(lambda: client.attach(JOB, after_seq=9).wait())
    _, watch_request, watch = channel.take_unary_stream(WATCH)
    assert watch_request.after_seq == 9
    watch.terminate((), OK, "")
    _, get_request, get = channel.take_unary_unary(GET_JOB)
    get.terminate(job_pb2.Job(name=JOB, state=job_pb2.JOB_STATE_SUCCEEDED, last_seq=9), (), OK, "")
    assert future.result(timeout=5).last_seq == 9
    assert get_request.name == JOB


def test_errors_other_than_transport_are_not_retried(client, channel, background):
    future = background(lambda: client.attach("jobs/nope").wait())
    _, _, watch = channel.take_unary_stream(WATCH)
    watch.terminate((), grpc.StatusCode.NOT_FOUND, "no job jobs/nope")
    with pytest.raises(paletta.NotFound):
        future.result(timeout=5)


def test_list_jobs_follows_pages_and_converts_state_names(client, channel, background):
    future = background(lambda: client.list_jobs(states=["queued", "running"], capability="generate", limit=None))
    _, first, rpc = channel.take_unary_unary(LIST_JOBS)
    rpc.terminate(job_service_pb2.ListJobsResponse(jobs=[job_pb2.Job(name="jobs/2")], next_page_token="p2"), (), OK, "")
    _, second, rpc = channel.take_unary_unary(LIST_JOBS)
    rpc.terminate(job_service_pb2.ListJobsResponse(jobs=[job_pb2.Job(name="jobs/1")]), (), OK, "")

    assert [j.name for j in future.result(timeout=5)] == ["jobs/2", "jobs/1"]
    assert list(first.states) == [job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING]
    assert first.capability == "generate" and second.page_token == "p2"


# -- async handle against a real grpc.aio servicer --------------------------------------------


class _DroppingServicer(generate_service_pb2_grpc.GenerateServiceServicer, job_service_pb2_grpc.JobServiceServicer):
    """Generate sends two events and drops the stream; WatchJob replays from after_seq."""

    def __init__(self) -> None:
        self.log = [
            event(1, queued=job_pb2.JobQueued()),
            event(2, started=job_pb2.JobStarted()),
            progress(3, 1, 1),
            finished(4, outputs=[output(0, "assets/a")]),
        ]
        self.watch_after: list[int] = []
        self.tokens: list[str] = []

    async def Generate(self, request, context):  # noqa: N802 - gRPC method name
        self.tokens.append(dict(context.invocation_metadata()).get("authorization", ""))
        for ev in self.log[:2]:
            yield ev
        await context.abort(grpc.StatusCode.UNAVAILABLE, "worker restarting")

    async def WatchJob(self, request, context):  # noqa: N802 - gRPC method name
        self.watch_after.append(request.after_seq)
        for ev in self.log:
            if ev.seq > request.after_seq:
                yield ev


async def test_async_handle_reattaches_after_dropped_stream():
    servicer = _DroppingServicer()
    server = grpc.aio.server()
    generate_service_pb2_grpc.add_GenerateServiceServicer_to_server(servicer, server)
    job_service_pb2_grpc.add_JobServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with paletta.AsyncClient(f"127.0.0.1:{port}", token="t", reconnect_timeout=5) as client:
            job = await client.generate("a knight", seed=1)
            seqs = [ev.seq async for ev in job]
            final = await job.wait()
    finally:
        await server.stop(0)
    assert seqs == [1, 2, 3, 4]
    assert servicer.watch_after == [2]
    assert servicer.tokens == ["Bearer t"]
    assert final.outputs[0].asset.name == "assets/a"


# -- end to end against the real server fixture (tests/conftest.py) ---------------------------


@pytest.mark.slow
async def test_async_client_end_to_end_on_tiny_server(server, tiny_image_bytes):
    async with paletta.AsyncClient(server.address) as client:
        job = await client.generate("a fox", width=64, height=48, steps=2, seed=3, variants=2)
        images = [image.size async for image in job.images()]
        assert images == [(64, 48), (64, 48)]
        final = await job.wait()
        assert final.state == job_pb2.JOB_STATE_SUCCEEDED and [o.seed for o in final.outputs] == [3, 4]

        replay = client.attach(job.name)  # after the fact: every event again, from seq 1
        assert [e.seq async for e in replay] == list(range(1, job.last_seq + 1))

        await client.approve_output(job.name, 1)
        approved = await client.list_approved()
        assert [(a.job, a.output.index) for a in approved][:1] == [(job.name, 1)]

        with pytest.raises(paletta.InvalidArgument) as caught:
            await client.generate("", width=17)
        assert {"prompt", "width"} <= {v.field for v in caught.value.field_violations}
        with pytest.raises(paletta.NotFound):
            await client.get_job("jobs/" + "0" * 32)

        asset = await client.upload(tiny_image_bytes)
        assert (asset.width, asset.height) == (96, 64)
        assert (await client.download_image(asset)).size == (96, 64)
        assert (await client.status()).profile == "tiny"
