"""The SDK: its sans-I/O job follower and request builders (no gRPC), its transports against a small
grpc.aio servicer that drops streams, and both clients end to end against the tiny server."""

from __future__ import annotations

import asyncio
import inspect
import io
import json
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from PIL import Image

import paletta
from paletta import _calls, _common, pipeline
from paletta._follow import FetchJob, Finished, JobFollower, Raise, Read, Submit, Watch
from paletta.v1 import (
    control_pb2,
    generate_pb2,
    generate_service_pb2_grpc,
    image_pb2,
    inpaint_pb2,
    job_options_pb2,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    job_spec_pb2,
    result_pb2,
    segment_pb2,
)
from tests.helpers import png_bytes

JOB = "jobs/7"


# -- building events --------------------------------------------------------------------------


def event(seq: int, **kind: Any) -> job_pb2.JobEvent:
    return job_pb2.JobEvent(job=JOB, seq=seq, **kind)


def progress(seq: int, step: int, total: int = 4, stage: str = "denoising", model: str = "") -> job_pb2.JobEvent:
    return event(seq, progress=job_pb2.JobProgress(step=step, total_steps=total, stage=stage, model=model))


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


def jpeg(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (9, 9, 9)).save(buf, format="JPEG")
    return buf.getvalue()


UNAVAILABLE = paletta.Unavailable("connection reset", code=grpc.StatusCode.UNAVAILABLE)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def submitted(**kwargs: Any) -> JobFollower:
    """A follower of a capability call that has been sent (its stream is open)."""
    follower = JobFollower(call="the call", reconnect_timeout=5, **kwargs)
    assert isinstance(follower.next_action(), Submit)
    follower.opened()
    return follower


# -- the follower, without I/O ----------------------------------------------------------------


def test_follower_turns_events_into_typed_progress_and_outputs():
    f = submitted()
    assert f.next_action() == Read()
    f.on_event(event(1, queued=job_pb2.JobQueued(position=3)))
    f.on_event(progress(2, 0, 1, stage="loading", model="flux-schnell"))
    f.on_event(progress(3, 1))
    f.on_event(event(4, preview=job_pb2.JobPreview(jpeg=jpeg((32, 24)), step=1)))
    f.on_event(event(5, output=output(0, "assets/a")))
    f.on_event(progress(6, 1))
    f.on_event(event(7, preview=job_pb2.JobPreview(jpeg=b"", step=1)))  # replayed late: pixels dropped
    assert f.next_action() == Read() and not f.done
    f.on_event(finished(8, outputs=[output(0, "assets/a"), output(1, "assets/b")]))

    updates = list(f.pending)
    progress_seen = [u.progress for u in updates if u.progress is not None]
    assert [(p.stage, p.step, p.total, p.variant, p.model) for p in progress_seen] == [
        ("queued", 0, 0, 0, ""),
        ("loading", 0, 1, 0, "flux-schnell"),
        ("denoising", 1, 4, 0, ""),
        ("denoising", 1, 4, 0, ""),
        ("denoising", 1, 4, 1, ""),
        ("denoising", 1, 4, 1, ""),
    ]
    assert progress_seen[0].queue_position == 3 and progress_seen[2].pipeline_step is None
    assert progress_seen[3].preview is not None and progress_seen[3].preview.size == (32, 24)
    assert progress_seen[5].preview is None
    assert [u.output.asset.name for u in updates if u.output is not None] == ["assets/a"]
    assert [o.asset.name for o in f.outputs_in_order()] == ["assets/a", "assets/b"]  # the final job adds #1
    assert f.next_action() == Finished(f.final) and f.done and f.name == JOB and f.last_seq == 8
    assert f.check().state == job_pb2.JOB_STATE_SUCCEEDED


def test_follower_reattaches_after_a_drop_from_the_last_seen_seq_and_drops_replays():
    f = submitted()
    f.on_event(event(1, queued=job_pb2.JobQueued()))
    f.on_event(event(2, started=job_pb2.JobStarted()))
    f.on_error(UNAVAILABLE)
    action = f.next_action()
    assert isinstance(action, Watch)
    assert (action.request.name, action.request.after_seq, action.delay) == (JOB, 2, 0.05)
    f.opened()
    assert f.on_event(event(2, started=job_pb2.JobStarted())) is None  # replayed duplicate
    assert f.on_event(progress(3, 1)) is not None
    f.on_error(UNAVAILABLE)  # a new event reset the backoff: the first delay again
    assert (f.next_action().request.after_seq, f.next_action().delay) == (3, 0.05)
    f.on_error(UNAVAILABLE)  # failing again in a row doubles it
    assert f.next_action().delay == 0.1
    f.opened()
    f.on_event(finished(4))
    assert [u.event.seq for u in f.pending] == [1, 2, 3, 4]
    assert f.reattach_count == 3 and isinstance(f.next_action(), Finished)


def test_follower_gives_up_once_the_reconnect_timeout_is_spent():
    clock = Clock()
    f = submitted(clock=clock)
    f.on_event(event(1, queued=job_pb2.JobQueued()))
    f.on_error(UNAVAILABLE)
    assert isinstance(f.next_action(), Watch)
    clock.now += 5.0
    f.on_error(UNAVAILABLE)
    assert f.next_action() == Raise(UNAVAILABLE)


def test_follower_raises_errors_that_are_not_transport_drops_and_errors_before_the_job_has_a_name():
    rejected = paletta.InvalidArgument("bad", code=grpc.StatusCode.INVALID_ARGUMENT)
    f = submitted()
    f.on_error(UNAVAILABLE)  # no event yet, so no job to re-attach to
    assert f.next_action() == Raise(UNAVAILABLE)
    f = submitted()
    f.on_error(rejected)
    assert f.next_action() == Raise(rejected)
    f = JobFollower(name=JOB)
    assert f.next_action().request.after_seq == 0  # attach: watch from the start
    f.on_error(paletta.NotFound("no job", code=grpc.StatusCode.NOT_FOUND))
    assert isinstance(f.next_action(), Raise)


def test_stream_ending_without_finished_asks_for_the_job_then_reattaches_or_ends():
    f = JobFollower(name=JOB, after_seq=4, reconnect_timeout=5)
    f.opened()
    f.on_end()
    assert f.next_action() == FetchJob(job_service_pb2.GetJobRequest(name=JOB))
    f.on_job(job_pb2.Job(name=JOB, state=job_pb2.JOB_STATE_RUNNING))
    assert isinstance(f.next_action(), Watch) and f.next_action().request.after_seq == 4
    f.opened()
    f.on_end()
    f.on_job(job_pb2.Job(name=JOB, state=job_pb2.JOB_STATE_SUCCEEDED, outputs=[output(0, "assets/z")]))
    assert isinstance(f.next_action(), Finished)
    assert [o.asset.name for o in f.outputs_in_order()] == ["assets/z"]
    f = submitted()
    f.on_end()  # the capability stream ended before any event
    assert isinstance(f.next_action(), Raise)


def test_failed_job_status_becomes_a_typed_error_with_reason_and_field_violations():
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="steps[2].inpaint.mask", description="selects nothing")
        ]
    )
    info = error_details_pb2.ErrorInfo(reason="EMPTY_MASK", domain="paletta", metadata={"step": "2"})
    error = rich_status(code_pb2.INVALID_ARGUMENT, "the auto mask selected nothing", bad, info)
    f = submitted()
    f.on_event(finished(1, state=job_pb2.JOB_STATE_FAILED, error=error))
    with pytest.raises(paletta.JobFailed) as caught:
        f.check()
    err = caught.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.reason, err.metadata) == ("EMPTY_MASK", {"step": "2"})
    assert err.field_violations == [paletta.FieldViolation("steps[2].inpaint.mask", "selects nothing")]
    assert err.job.name == JOB and "the auto mask selected nothing" in str(err)
    assert not isinstance(err, paletta.JobCancelled)


def test_cancelled_job_raises_job_cancelled():
    f = submitted()
    f.on_event(finished(1, state=job_pb2.JOB_STATE_CANCELLED))
    with pytest.raises(paletta.JobCancelled) as caught:
        f.check()
    assert caught.value.code == grpc.StatusCode.CANCELLED


def test_pipeline_progress_numbers_steps_and_variants_within_each_step():
    f = submitted()
    f.on_event(progress(1, 0, 2, stage="pipeline"))
    f.on_event(progress(2, 1, 2))
    f.on_event(event(3, output=output(0, "assets/a")))
    f.on_event(progress(4, 1, 2))
    f.on_event(event(5, output=output(1, "assets/b")))
    f.on_event(progress(6, 1, 2, stage="pipeline"))
    f.on_event(progress(7, 3, 8, stage="inference"))
    seen = [(u.progress.stage, u.progress.pipeline_step, u.progress.variant) for u in f.pending if u.progress]
    assert seen == [
        ("pipeline", 0, 0),
        ("denoising", 0, 0),
        ("denoising", 0, 1),
        ("pipeline", 1, 0),
        ("inference", 1, 0),
    ]


def test_pager_cuts_at_the_limit_and_follows_tokens():
    pager = _calls.list_jobs(["queued", "running"], "generate", limit=3)
    assert pager.rpc.request.page_size == 3
    assert list(pager.rpc.request.states) == [job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING]
    page = job_service_pb2.ListJobsResponse(jobs=[job_pb2.Job(name="jobs/3"), job_pb2.Job(name="jobs/2")],
                                            next_page_token="p2")
    assert [j.name for j in pager.feed(page)] == ["jobs/3", "jobs/2"]
    assert not pager.done and pager.rpc.request.page_token == "p2"
    page = job_service_pb2.ListJobsResponse(jobs=[job_pb2.Job(name="jobs/1"), job_pb2.Job(name="jobs/0")],
                                            next_page_token="p3")
    assert [j.name for j in pager.feed(page)] == ["jobs/1"] and pager.done
    everything = _calls.list_approved(limit=None)
    assert everything.rpc.request.page_size == 0
    everything.feed(job_service_pb2.ListApprovedOutputsResponse())
    assert everything.done


# -- request builders, without I/O ------------------------------------------------------------


class Recorder(paletta.Client):
    """A Client whose capability calls are recorded instead of sent."""

    def __init__(self) -> None:
        self.calls: list[_calls.JobCall[Any]] = []

    def _submit(self, call):
        self.calls.append(call)
        return call


def test_requests_carry_job_options_and_leave_unset_optionals_to_the_server():
    rec = Recorder()
    rec.generate("a knight", width=512, seed=0, styles=["tarot:0.8", "anime"], request_id="r1", priority="high")
    rec.control("edges.png", "a city", "canny", preprocess="canny", cancel_on_disconnect=True)
    rec.generate("plain")
    knight, city, plain = (call.request for call in rec.calls)
    assert (knight.options.request_id, knight.options.priority) == ("r1", job_options_pb2.PRIORITY_HIGH)
    assert knight.HasField("seed") and knight.seed == 0 and knight.width == 512 and not knight.HasField("height")
    assert [(s.name, s.HasField("weight")) for s in knight.styles] == [("tarot", True), ("anime", False)]
    assert not any(plain.HasField(f) for f in ("width", "height", "steps", "seed", "variants", "guidance"))
    assert plain.options == job_options_pb2.JobOptions()
    assert city.control_type == control_pb2.CONTROL_TYPE_CANNY and city.preprocess == control_pb2.PREPROCESS_CANNY
    assert not city.HasField("width") and not city.HasField("height")  # the control image's size
    assert city.options.cancel_on_disconnect
    assert [(slot.field, slot.value) for slot in rec.calls[1].images] == [("control_image", "edges.png")]


def test_inpaint_with_auto_mask_runs_a_segment_job_whose_mask_fills_the_request():
    rec = Recorder()
    rec.inpaint("photo.png", None, "a red coat", auto_mask="her coat", auto_mask_dilate=4, priority="low")
    (call,) = rec.calls
    (dependency,) = call.dependencies
    assert isinstance(dependency.call.request, segment_pb2.SegmentRequest)
    assert (dependency.call.request.text, dependency.call.request.dilate) == ("her coat", 4)
    assert dependency.call.request.options.priority == job_options_pb2.PRIORITY_LOW
    assert [slot.field for slot in call.images] == ["image"]
    mask = job_pb2.Job(name="jobs/1", outputs=[job_pb2.JobOutput(asset=image_pb2.Asset(name="assets/mask"))])
    dependency.fill(mask)
    assert call.request.mask.asset == "assets/mask"
    with pytest.raises(ValueError, match="mask or auto_mask, not both"):
        rec.inpaint("photo.png", "mask.png", "x", auto_mask="coat")


def test_pipeline_script_and_request_steps_become_job_specs():
    steps = pipeline.parse("[generate|tarot:0.5] a knight\n[auto_mask] the knight\n[inpaint] armor\n[remove_bg]")
    assert [s.WhichOneof("spec") for s in steps] == ["generate", "segment", "inpaint", "remove_background"]
    assert steps[1].segment.text == "the knight" and steps[0].generate.styles[0].weight == pytest.approx(0.5)
    rec = Recorder()
    rec.pipeline(
        [generate_pb2.GenerateRequest(prompt="a"), segment_pb2.SegmentRequest(text="b"),
         job_spec_pb2.JobSpec(inpaint=inpaint_pb2.InpaintRequest(prompt="c")),
         inpaint_pb2.OutpaintRequest(left=64)],
        image="assets/start",
        priority="low",
    )
    request = rec.calls[0].request
    assert [s.WhichOneof("spec") for s in request.steps] == ["generate", "segment", "inpaint", "outpaint"]
    assert request.options.priority == job_options_pb2.PRIORITY_LOW
    with pytest.raises(TypeError):
        pipeline.to_spec(job_pb2.Job())
    with pytest.raises(ValueError, match="line 1: unknown mode 'paint'"):
        pipeline.parse("[paint] a cat")
    # any step and field as JSON JobSpecs (protobuf's JSON names)
    steps = pipeline.parse('[{"outpaint": {"prompt": "sea", "left": 128, "seed": "7"}},'
                           ' {"control": {"prompt": "a tower", "controlType": "CONTROL_TYPE_DEPTH"}}]')
    assert [s.WhichOneof("spec") for s in steps] == ["outpaint", "control"]
    assert (steps[0].outpaint.left, steps[0].outpaint.seed) == (128, 7)
    assert steps[1].control.control_type == control_pb2.CONTROL_TYPE_DEPTH
    with pytest.raises(ValueError, match="step 2: .*no_such_field"):
        pipeline.parse('[{"generate": {"prompt": "a"}}, {"generate": {"no_such_field": 1}}]')
    with pytest.raises(ValueError, match="non-empty list"):
        pipeline.parse("[]")
    with pytest.raises(ValueError, match="JSON steps, line 3 column 1"):  # a trailing comma: refused, not a script
        pipeline.parse('[\n  {"generate": {"prompt": "a"}},\n]')
    # an empty style slot takes the default styles, on the lines whose mode takes styles
    steps = pipeline.parse("[generate] a\n[edit|koda:0.5] b\n[|] c\n[auto_mask] d\n[inpaint] e", styles=["tarot:0.8"])
    assert [[(x.name, round(x.weight, 2)) for x in (s.generate.styles or s.edit.styles)]
            for s in steps[:3]] == [[("tarot", 0.8)], [("koda", 0.5)], [("tarot", 0.8)]]
    assert not steps[4].inpaint.styles
    with pytest.raises(ValueError, match="give each JSON step its own styles"):
        pipeline.parse('[{"generate": {"prompt": "a"}}]', styles=["tarot"])
    # a script stays a script, even one that is valid JSON
    assert [s.generate.prompt for s in pipeline.parse("1984")] == ["1984"]
    assert [s.WhichOneof("spec") for s in pipeline.parse("[] a cat\n[|tarot] at night")] == ["generate", "edit"]


def test_output_results_become_dataclasses():
    detections = result_pb2.Detections(
        detections=[
            result_pb2.Detection(label="dog", score=0.5, box=result_pb2.Box(x_min=1, y_min=2, x_max=11, y_max=7))
        ],
        image_width=20,
        image_height=10,
    )
    assert paletta.results.result_of(job_pb2.JobOutput(detections=detections)) == paletta.Detections(
        [paletta.Detection("dog", 0.5, paletta.Box(1, 2, 11, 7))], 20, 10
    )
    caption = job_pb2.JobOutput(caption=result_pb2.Caption(text="a dog", objects=["dog"]))
    assert paletta.results.result_of(caption) == paletta.Caption("a dog", ["dog"])
    mask = job_pb2.JobOutput(
        asset=image_pb2.Asset(name="assets/m"), segmentation=result_pb2.Segmentation(coverage=0.25)
    )
    assert paletta.results.result_of(mask) == paletta.Segmentation("assets/m", 0.25)
    assert paletta.results.result_of(job_pb2.JobOutput(asset=image_pb2.Asset(name="assets/x"))) is None
    assert paletta.Box(1, 2, 11, 7).width == 10 and paletta.Progress("denoising", 1, 4).fraction == 0.25


def test_coercions():
    assert [(s.name, s.weight) for s in _common.styles({"tarot": 1.5})] == [("tarot", 1.5)]
    assert _common.priority("high") == job_options_pb2.PRIORITY_HIGH
    assert _common.upscaler("REALESRGAN") == image_pb2.UPSCALER_REALESRGAN
    assert _common.job_state("running") == job_pb2.JOB_STATE_RUNNING
    with pytest.raises(ValueError, match="choose one of low, normal, high"):
        _common.priority("urgent")
    with pytest.raises(ValueError, match="not a number"):
        _common.parse_style("tarot:heavy")
    with pytest.raises(TypeError):
        _common.prepare_image(42)  # type: ignore[arg-type]


# -- the two clients stay equal ---------------------------------------------------------------

# Transport-only members: how each kind of code closes, enters and awaits.
TRANSPORT_ONLY = {"__enter__", "__exit__", "__aenter__", "__aexit__", "__await__", "__iter__", "__aiter__"}


def public(cls: type) -> set[str]:
    return {n for n in dir(cls) if (not n.startswith("_") or n in TRANSPORT_ONLY)} - TRANSPORT_ONLY


def test_sync_and_async_clients_and_handles_have_the_same_public_methods():
    assert public(paletta.Client) == public(paletta.AsyncClient)
    assert public(paletta.JobHandle) == public(paletta.AsyncJobHandle)
    for name in ["generate", "edit", "inpaint", "outpaint", "qwen_edit", "control", "upscale", "remove_background",
                 "segment", "detect", "ground", "caption", "analyze", "expand", "pipeline", "iter_jobs"]:
        assert name in public(paletta.AsyncClient)
    for name in public(paletta.Client):
        sync, aio = getattr(paletta.Client, name), getattr(paletta.AsyncClient, name)
        if callable(sync):
            assert list(inspect.signature(sync).parameters) == list(inspect.signature(aio).parameters), name


async def test_async_capability_calls_return_an_awaitable_handle_without_sending_anything():
    client = paletta.AsyncClient("127.0.0.1:1")
    handle = client.edit(b"not sent", "make it night")
    assert isinstance(handle, paletta.AsyncJobHandle) and inspect.isawaitable(handle)
    assert inspect.iscoroutinefunction(paletta.AsyncJobHandle.image)
    assert handle.name == "" and not handle.done


# -- transports: a servicer that drops the stream ---------------------------------------------


class DroppingServicer(generate_service_pb2_grpc.GenerateServiceServicer, job_service_pb2_grpc.JobServiceServicer):
    """Generate sends two events and drops the stream; WatchJob replays from after_seq."""

    def __init__(self) -> None:
        self.log = [
            event(1, queued=job_pb2.JobQueued()),
            event(2, started=job_pb2.JobStarted()),
            progress(3, 1, 1),
            event(4, output=output(0, "assets/a")),
            finished(5, outputs=[output(0, "assets/a")]),
        ]
        self.watch_after: list[int] = []
        self.tokens: list[str] = []
        self.requests: list[generate_pb2.GenerateRequest] = []

    async def Generate(self, request, context):  # noqa: N802 - gRPC method name
        self.requests.append(request)
        self.tokens.append(dict(context.invocation_metadata()).get("authorization", ""))
        for ev in self.log[:2]:
            yield ev
        await context.abort(grpc.StatusCode.UNAVAILABLE, "worker restarting")

    async def WatchJob(self, request, context):  # noqa: N802 - gRPC method name
        self.watch_after.append(request.after_seq)
        for ev in self.log:
            if ev.seq > request.after_seq:
                yield ev


@pytest.fixture
async def dropping():
    servicer = DroppingServicer()
    server = grpc.aio.server()
    generate_service_pb2_grpc.add_GenerateServiceServicer_to_server(servicer, server)
    job_service_pb2_grpc.add_JobServiceServicer_to_server(servicer, server)
    servicer.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    yield servicer
    await server.stop(0)


async def test_async_handle_reattaches_after_a_dropped_stream(dropping):
    seen: list[paletta.Progress] = []
    async with paletta.AsyncClient(dropping.address, token="t", reconnect_timeout=5) as client:
        job = await client.generate("a knight", seed=1, priority="high")
        final = await job.wait(on_progress=seen.append)
    assert [(p.stage, p.step, p.total) for p in seen] == [("queued", 0, 0), ("denoising", 1, 1)]
    assert dropping.watch_after == [2] and job.reattach_count == 1
    assert dropping.tokens == ["Bearer t"]
    assert dropping.requests[0].options.priority == job_options_pb2.PRIORITY_HIGH
    assert final.outputs[0].asset.name == "assets/a" and job.last_seq == 5


async def test_sync_handle_reattaches_after_a_dropped_stream(dropping):
    def follow():
        with paletta.Client(dropping.address, token="t", reconnect_timeout=5) as client:
            job = client.generate("a knight")
            seqs = [ev.seq for ev in job]
            return seqs, [o.asset.name for o in job.outputs()], job.reattach_count

    seqs, outputs, reattached = await asyncio.to_thread(follow)
    assert seqs == [1, 2, 3, 4, 5] and outputs == ["assets/a"] and reattached == 1
    assert dropping.watch_after == [2]


# -- end to end against the tiny server (tests/conftest.py) -----------------------------------


@pytest.mark.slow
async def test_sync_client_end_to_end_on_tiny_server(server, tiny_image_bytes):
    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with paletta.Client(server.address) as client:
            job = client.generate("a fox", width=64, height=48, steps=2, seed=3, variants=2)
            out["progress"] = list(job.progress())
            out["sizes"] = [image.size for image in job.images()]
            out["final"] = job.wait()
            out["night"] = client.edit(tiny_image_bytes, "make it night", steps=1, seed=1).image()
            out["segmentation"] = client.segment(tiny_image_bytes, "the sky").result()
            out["detections"] = client.detect(tiny_image_bytes, threshold=0.0).result()
            out["caption"] = client.caption(tiny_image_bytes, max_tokens=8).result()
            out["expansion"] = client.expand("knight in forest", seed=1, max_tokens=12).result()
            out["inpainted"] = client.inpaint(
                tiny_image_bytes, None, "armor", auto_mask="the sky", auto_mask_threshold=0.0, steps=1, seed=2
            ).image()
            out["listed"] = [j.name for j in client.iter_jobs(capability="generate")]
            with pytest.raises(paletta.InvalidArgument) as caught:
                client.generate("", width=17)
            out["violations"] = {v.field for v in caught.value.field_violations}
            out["approved"] = client.approve_output(job, 1).outputs[1].approved
            out["spec"] = client.get_job(job.name).spec
        return out

    out = await asyncio.to_thread(run)
    denoising = [p for p in out["progress"] if p.stage == "denoising"]
    assert [(p.step, p.total, p.variant) for p in denoising] == [(1, 2, 0), (2, 2, 0), (1, 2, 1), (2, 2, 1)]
    assert out["sizes"] == [(64, 48), (64, 48)]
    assert [o.seed for o in out["final"].outputs] == [3, 4]
    assert out["night"].size == (96, 64)
    assert isinstance(out["segmentation"], paletta.Segmentation)
    assert out["segmentation"].mask.startswith("assets/") and 0.0 <= out["segmentation"].coverage <= 1.0
    assert isinstance(out["detections"], paletta.Detections)
    assert (out["detections"].image_width, out["detections"].image_height) == (96, 64) and len(out["detections"])
    assert isinstance(out["caption"], paletta.Caption) and out["caption"].text
    assert isinstance(out["expansion"], paletta.PromptExpansion) and out["expansion"].original == "knight in forest"
    assert out["inpainted"].size == (96, 64)
    assert out["listed"][0] == out["final"].name
    assert {"prompt", "width"} <= out["violations"]
    assert out["approved"] is True
    assert out["spec"].WhichOneof("spec") == "generate" and out["spec"].generate.seed == 3


@pytest.mark.slow
async def test_async_client_end_to_end_on_tiny_server(server, tiny_image_bytes):
    async with paletta.AsyncClient(server.address) as client:
        night = await client.edit(tiny_image_bytes, "make it night", steps=1, seed=1).image()
        assert night.size == (96, 64)

        job = client.generate("a fox", width=64, height=48, steps=2, seed=3, variants=2)
        previews: list[paletta.Progress] = []

        async def on_progress(p: paletta.Progress) -> None:
            previews.append(p)

        assert [image.size async for image in job.images(on_progress=on_progress)] == [(64, 48), (64, 48)]
        final = await job.wait()
        assert final.state == job_pb2.JOB_STATE_SUCCEEDED and [o.seed for o in final.outputs] == [3, 4]
        assert [p.variant for p in previews if p.stage == "denoising"] == [0, 0, 1, 1]

        replay = client.attach(job.name)  # after the fact: every event again, from seq 1
        assert [e.seq async for e in replay] == list(range(1, job.last_seq + 1))

        caption = await client.analyze(tiny_image_bytes, threshold=0.0).result()
        assert isinstance(caption, paletta.Caption) and caption.objects

        steps = await client.pipeline(
            "[generate] a knight\n[auto_mask] the knight\n[upscale]", priority="low"
        ).wait()
        params = [json.loads(o.parameters) for o in steps.outputs]
        assert [p["step_capability"] for p in params][:2] == ["generate", "segment"]
        assert steps.spec.pipeline.steps[1].WhichOneof("spec") == "segment"

        await client.approve_output(job, 1)
        approved = await client.list_approved()
        assert [(a.job, a.output.index) for a in approved][:1] == [(job.name, 1)]
        assert [j.name async for j in client.iter_jobs(limit=1)] == [steps.name]

        with pytest.raises(paletta.InvalidArgument) as caught:
            await client.generate("", width=17)
        assert {"prompt", "width"} <= {v.field for v in caught.value.field_violations}
        with pytest.raises(paletta.NotFound):
            await client.get_job("jobs/" + "0" * 32)

        asset = await client.upload(png_bytes((96, 64)))
        assert (asset.width, asset.height) == (96, 64)
        assert (await client.download_image(asset)).size == (96, 64)
        assert (await client.status()).profile == "tiny"
