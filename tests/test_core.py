"""Issue 7's core: a job remembers what was asked (Job.spec), a capability is declared once, one
state machine, the worker's messages (outputs stored off the device thread), validated page
tokens, errors kept as google.rpc.Status."""

import asyncio
import base64
import dataclasses
import json
import threading
import time

import grpc
import pytest

from paletta.v1 import (
    control_pb2,
    control_service_pb2_grpc,
    generate_pb2,
    generate_service_pb2_grpc,
    image_pb2,
    inpaint_pb2,
    job_options_pb2,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    job_spec_pb2,
    pipeline_service_pb2_grpc,
    result_pb2,
    system_service_pb2,
    system_service_pb2_grpc,
    upscale_pb2,
)
from paletta_server.api.capabilities import capability_rpcs
from paletta_server.capabilities import discover
from paletta_server.jobs import paging
from paletta_server.jobs.state import FINAL, IllegalTransition, JobState, check_transition
from paletta_server.models.registry import SPECS
from tests.helpers import collect, download, download_image, error_reason, field_violations, png_bytes, upload
from tests.pg import both_stores

GEN = dict(prompt="a lighthouse", width=64, height=64, steps=2, seed=11)


def jobs_stub(server):
    return job_service_pb2_grpc.JobServiceStub(server.channel)


# -- a capability is declared once --------------------------------------------------------------
def test_every_declaration_is_consistent_with_the_contracts():
    capabilities = discover()
    spec_fields = {f.name: f.message_type.full_name for f in job_spec_pb2.JobSpec.DESCRIPTOR.fields}
    results = {f.message_type.full_name for f in job_pb2.JobOutput.DESCRIPTOR.oneofs_by_name["result"].fields}
    keys = {s.key for s in SPECS}
    served = {cap.name for cap in capability_rpcs(capabilities).values()}
    assert served == set(capabilities) == set(spec_fields)
    for name, cap in capabilities.items():
        assert spec_fields[name] == cap.request_type.DESCRIPTOR.full_name, name
        assert cap.request_type.DESCRIPTOR.fields_by_name["options"].number == 100, name
        assert cap.result_type is None or cap.result_type.DESCRIPTOR.full_name in results, name
        assert set(cap.model_keys) <= keys, name
        for field_name, what in cap.chains.items():
            assert cap.request_type.DESCRIPTOR.fields_by_name[field_name].message_type.name == "ImageRef"
            assert what in ("image", "mask")
        assert cap.makes in ("image", "mask", "")


async def test_list_models_names_the_capabilities_that_use_each_model(server):
    models = await system_service_pb2_grpc.SystemServiceStub(server.channel).ListModels(
        system_service_pb2.ListModelsRequest())
    users = {m.key: set(m.capabilities) for m in models.models}
    assert users["flux-fill"] == {"inpaint", "outpaint"}
    assert users["realesrgan-x4plus"] >= {"upscale", "edit", "inpaint", "control"}
    assert users["detr-resnet-50"] == {"detect", "analyze"}


# -- a job remembers what was asked -------------------------------------------------------------
@both_stores
async def test_job_spec_is_the_prepared_request_without_options_and_reruns_the_job(server):
    stub = generate_service_pb2_grpc.GenerateServiceStub(server.channel)
    request = generate_pb2.GenerateRequest(
        prompt="a lighthouse", width=64, height=64, steps=2,  # seed left unset: the server fixes one
        options=job_options_pb2.JobOptions(request_id="spec-1", priority=job_options_pb2.PRIORITY_LOW))
    first = (await collect(stub.Generate(request)))[-1].finished.job
    got = await jobs_stub(server).GetJob(job_service_pb2.GetJobRequest(name=first.name))
    assert got.spec.WhichOneof("spec") == got.capability == "generate"
    spec = got.spec.generate
    assert not spec.HasField("options") and spec.HasField("seed") and spec.variants == 1
    assert spec.HasField("guidance") and spec.guidance == 0.0  # every default is in the spec, unset ones too
    assert got.request_id == "spec-1" and got.priority == job_options_pb2.PRIORITY_LOW
    # Re-running from the spec gives the same image.
    again = (await collect(stub.Generate(spec)))[-1].finished.job
    assert again.name != first.name and again.spec == got.spec
    pixels = [(await download_image(server.channel, job.outputs[0].asset.name)).tobytes() for job in (first, again)]
    assert pixels[0] == pixels[1]  # (the files differ: their parameters name their own job)
    listed = await jobs_stub(server).ListJobs(job_service_pb2.ListJobsRequest(capability="generate"))
    assert {j.name: j.spec.generate.seed for j in listed.jobs} == {first.name: spec.seed, again.name: spec.seed}


async def test_a_spec_stored_without_its_defaults_runs_with_them(server):
    """Specs stored by an older version (queued across an upgrade, or from an older front end of a
    shared store) lack the defaults prepare fills in now: the job still runs with them, not with 0."""
    asset = await upload(server.channel, png_bytes((48, 32)))
    old = job_spec_pb2.JobSpec(control=control_pb2.ControlRequest(
        prompt="a tower", control_image=image_pb2.ImageRef(asset=asset.name),
        control_type=control_pb2.CONTROL_TYPE_CANNY, steps=1, variants=1, seed=3))
    job_id, _ = await asyncio.to_thread(server.app.manager.submit, "control", old.SerializeToString(),
                                        job_options_pb2.PRIORITY_NORMAL, "", "flux-controlnet-union", False)
    events = await collect(jobs_stub(server).WatchJob(job_service_pb2.WatchJobRequest(name=f"jobs/{job_id}")))
    job = events[-1].finished.job
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error.message
    parameters = json.loads(job.outputs[0].parameters)
    assert (parameters["control_scale"], parameters["guidance"]) == (0.7, 3.5)
    assert (job.outputs[0].asset.width, job.outputs[0].asset.height) == (48, 32)  # the control image's size
    # sent today, the same request stores every default, the size of its control image included
    sent = control_service_pb2_grpc.ControlServiceStub(server.channel).Control(old.control)
    spec = (await collect(sent))[-1].finished.job.spec.control
    assert (round(spec.control_scale, 2), spec.guidance, spec.width, spec.height) == (0.7, 3.5, 48, 32)


async def test_inline_images_are_stored_as_assets_in_the_spec(server):
    stub = pipeline_service_pb2_grpc.PipelineServiceStub(server.channel)
    request = job_spec_pb2.RunPipelineRequest(
        image=image_pb2.ImageRef(inline=png_bytes((48, 32))),
        steps=[job_spec_pb2.JobSpec(outpaint=inpaint_pb2.OutpaintRequest(prompt="sea", left=16, steps=2, seed=1)),
               job_spec_pb2.JobSpec(control=control_pb2.ControlRequest(
                   prompt="a tower", control_type=control_pb2.CONTROL_TYPE_CANNY,
                   preprocess=control_pb2.PREPROCESS_CANNY, steps=2, seed=1)),
               job_spec_pb2.JobSpec(upscale=upscale_pb2.UpscaleRequest(scale=2.0))])
    job = (await collect(stub.RunPipeline(request)))[-1].finished.job
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error.message
    assert job.spec.pipeline.image.WhichOneof("source") == "asset"
    # outpaint → control (its control_image chained) → upscale, each output tagged with its step
    steps = [json.loads(o.parameters)["step_capability"] for o in job.outputs]
    assert steps == ["outpaint", "control", "upscale"]
    assert (job.outputs[0].asset.width, job.outputs[0].asset.height) == (64, 32)
    assert (job.outputs[2].asset.width, job.outputs[2].asset.height) == (
        job.outputs[1].asset.width * 2, job.outputs[1].asset.height * 2)
    # chained inputs stay unset in the stored spec: they were the previous step's output
    assert job.spec.pipeline.steps[1].control.control_image.WhichOneof("source") is None
    # each step's defaults are filled in: what ran, not what was left out
    outpaint, control = job.spec.pipeline.steps[0].outpaint, job.spec.pipeline.steps[1].control
    assert (outpaint.HasField("guidance"), outpaint.guidance, outpaint.variants) == (True, 30.0, 1)
    assert (control.guidance, round(control.control_scale, 2)) == (3.5, 0.7)
    assert not control.HasField("width")  # unset: the size of the image chained in at run time
    assert (job.outputs[1].asset.width, job.outputs[1].asset.height) == (64, 32)


async def test_a_pipeline_is_not_a_pipeline_step(server):
    stub = pipeline_service_pb2_grpc.PipelineServiceStub(server.channel)
    inner = job_spec_pb2.RunPipelineRequest(steps=[job_spec_pb2.JobSpec(generate=generate_pb2.GenerateRequest(**GEN))])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.RunPipeline(job_spec_pb2.RunPipelineRequest(steps=[job_spec_pb2.JobSpec(pipeline=inner)])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "steps[0]" in field_violations(err.value)


# -- one error path -----------------------------------------------------------------------------
@both_stores
async def test_a_cancelled_job_keeps_its_status_with_error_info(server):
    stub = generate_service_pb2_grpc.GenerateServiceStub(server.channel)
    stream = stub.Generate(generate_pb2.GenerateRequest(**{**GEN, "steps": 100, "width": 256, "seed": 2}))
    first = await stream.read()
    await jobs_stub(server).CancelJob(job_service_pb2.CancelJobRequest(name=first.job))
    events = [first] + await collect(stream)
    final = events[-1].finished.job
    assert final.state == job_pb2.JOB_STATE_CANCELLED and final.error.code == grpc.StatusCode.CANCELLED.value[0]
    assert error_reason(final.error) == "CANCELLED"
    stored = await jobs_stub(server).GetJob(job_service_pb2.GetJobRequest(name=first.job))
    assert stored.error == final.error


# -- page tokens ----------------------------------------------------------------------------------
@both_stores
@pytest.mark.parametrize("token", [
    "o:" + "9" * 30, base64.urlsafe_b64encode(b"o:" + b"9" * 30).decode(), "%%%",
    paging._encode("approved", "2026-01-01T00:00:00", "a" * 32, 2**40),
    paging._encode("approved", "2026-01-01T00:00:00+05:00", "a" * 32, 1),
    paging._encode("approved", "not a time", "a" * 32, 1),
    paging._encode("jobs", [[], ""], "2026-01-01T00:00:00", "a" * 32),
    paging._encode("approved", "2026-01-01T00:00:00", "'; drop table jobs; --", 1),
])
async def test_crafted_page_tokens_are_invalid_argument(server, token):
    jobs = jobs_stub(server)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.ListApprovedOutputs(job_service_pb2.ListApprovedOutputsRequest(page_token=token))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and list(field_violations(err.value)) == ["page_token"]


@both_stores
async def test_job_list_token_is_refused_by_the_other_list(server):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs_stub(server).ListJobs(job_service_pb2.ListJobsRequest(
            page_token=paging._encode("approved", "2026-01-01T00:00:00", "a" * 32, 1)))
    assert list(field_violations(err.value)) == ["page_token"]


@both_stores
async def test_well_formed_tokens_this_server_did_not_make_are_invalid_argument(server):
    """A token is checked against the list's filters and the store, not only its shape."""
    stub = generate_service_pb2_grpc.GenerateServiceStub(server.channel)
    jobs = jobs_stub(server)
    for seed in range(2):
        await collect(stub.Generate(generate_pb2.GenerateRequest(**{**GEN, "seed": seed, "variants": 2})))
    listed = await jobs.ListJobs(job_service_pb2.ListJobsRequest(page_size=1, capability="generate"))
    job = listed.jobs[0]
    job_id, created = job.name.removeprefix("jobs/"), job.create_time.ToDatetime().isoformat()
    real = await jobs.ListJobs(job_service_pb2.ListJobsRequest(
        page_size=1, capability="generate", page_token=listed.next_page_token))
    assert real.jobs[0].name != job.name  # the genuine token pages on
    forged = {
        "another filter": (job_service_pb2.ListJobsRequest(page_token=listed.next_page_token), None),
        "a future time": (job_service_pb2.ListJobsRequest(page_token=paging._encode(
            "jobs", [[], ""], "9999-12-31T23:59:59.999999", job_id)), None),
        "an unknown job": (job_service_pb2.ListJobsRequest(page_token=paging._encode(
            "jobs", [[], ""], created, "0" * 32)), None),
        "states it was not made for": (job_service_pb2.ListJobsRequest(
            states=[job_pb2.JOB_STATE_SUCCEEDED], capability="generate", page_token=listed.next_page_token), None),
        "an output the job lacks": (None, job_service_pb2.ListApprovedOutputsRequest(page_token=paging._encode(
            "approved", created, job_id, 99))),
        "a date for a time": (None, job_service_pb2.ListApprovedOutputsRequest(page_token=paging._encode(
            "approved", created[:10], job_id, 0))),
    }
    for what, (list_jobs, list_approved) in forged.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await (jobs.ListJobs(list_jobs) if list_jobs else jobs.ListApprovedOutputs(list_approved))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
        assert list(field_violations(err.value)) == ["page_token"], what
    approved = await jobs.ListApprovedOutputs(job_service_pb2.ListApprovedOutputsRequest(
        page_token=paging._encode("approved", created, job_id, 1)))
    assert approved.outputs == []  # a key this server would make pages on (nothing approved here)


@both_stores
async def test_approved_outputs_page_by_keyset_and_new_approvals_do_not_shift_pages(server):
    stub = generate_service_pb2_grpc.GenerateServiceStub(server.channel)
    jobs = jobs_stub(server)
    names = []
    for seed in range(3):
        job = (await collect(stub.Generate(generate_pb2.GenerateRequest(**{**GEN, "seed": seed, "variants": 2}))))
        names.append(job[-1].finished.job.name)
    for name in names:
        for index in (0, 1):
            await jobs.ApproveOutput(job_service_pb2.ApproveOutputRequest(name=name, index=index, approved=True))
    first = await jobs.ListApprovedOutputs(job_service_pb2.ListApprovedOutputsRequest(page_size=4))
    assert [(o.job, o.output.index) for o in first.outputs] == [
        (names[2], 0), (names[2], 1), (names[1], 0), (names[1], 1)]
    newer = (await collect(stub.Generate(generate_pb2.GenerateRequest(**{**GEN, "seed": 9}))))[-1].finished.job
    await jobs.ApproveOutput(job_service_pb2.ApproveOutputRequest(name=newer.name, index=0, approved=True))
    second = await jobs.ListApprovedOutputs(job_service_pb2.ListApprovedOutputsRequest(
        page_size=4, page_token=first.next_page_token))
    assert [(o.job, o.output.index) for o in second.outputs] == [(names[0], 0), (names[0], 1)]
    assert second.next_page_token == ""


# -- the state machine and the worker boundary ------------------------------------------------
def test_state_machine_allows_only_its_edges():
    check_transition("j", JobState.QUEUED, JobState.RUNNING)
    check_transition("j", JobState.RUNNING, JobState.CANCELLED)
    for final in FINAL:
        for state in JobState:
            with pytest.raises(IllegalTransition):
                check_transition("j", final, state)
    with pytest.raises(IllegalTransition):
        check_transition("j", JobState.RUNNING, JobState.QUEUED)  # a job never runs twice
    with pytest.raises(IllegalTransition):
        check_transition("j", JobState.QUEUED, JobState.SUCCEEDED)


async def test_device_starts_the_next_job_while_outputs_are_still_stored(server):
    """The worker reports outputs as messages; encoding and storing happen on the event thread."""
    app = server.app
    original_put, original_run = app.assets.put_image, app.capabilities["generate"].run
    timeline: list[tuple[str, float, str]] = []

    def slow_put(image, parameters=None):
        time.sleep(1.0)
        info = original_put(image, parameters)
        timeline.append(("stored", time.monotonic(), threading.current_thread().name))
        return info

    def timed_run(request, ctx):
        timeline.append(("run", time.monotonic(), threading.current_thread().name))
        return original_run(request, ctx)

    app.assets.put_image = slow_put
    app.capabilities["generate"] = dataclasses.replace(app.capabilities["generate"], run=timed_run)
    stub = generate_service_pb2_grpc.GenerateServiceStub(server.channel)
    results = await asyncio.gather(collect(stub.Generate(generate_pb2.GenerateRequest(**GEN))),
                                   collect(stub.Generate(generate_pb2.GenerateRequest(**{**GEN, "seed": 12}))))
    runs = [t for kind, t, _ in timeline if kind == "run"]
    stores = [t for kind, t, _ in timeline if kind == "stored"]
    assert len(runs) == len(stores) == 2
    assert runs[1] < stores[0]  # job 2 ran on the device while job 1's output was being written
    assert {thread for kind, _, thread in timeline if kind == "stored"} == {"paletta-events"}
    assert {thread for kind, _, thread in timeline if kind == "run"} == {"paletta-device"}
    for events in results:
        kinds = [e.WhichOneof("kind") for e in events]
        assert kinds.index("output") < kinds.index("finished") == len(kinds) - 1
        job = events[-1].finished.job
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED and len(job.outputs) == 1
        assert len(await download(server.channel, job.outputs[0].asset.name)) == job.outputs[0].asset.size_bytes


@both_stores
async def test_typed_results_travel_as_messages(server):
    from paletta.v1 import detect_pb2, detect_service_pb2_grpc

    stub = detect_service_pb2_grpc.DetectServiceStub(server.channel)
    job = (await collect(stub.Detect(detect_pb2.DetectRequest(
        image=image_pb2.ImageRef(inline=png_bytes((64, 48))), threshold=0.0))))[-1].finished.job
    assert job.outputs[0].WhichOneof("result") == "detections"
    assert isinstance(job.outputs[0].detections, result_pb2.Detections)


# A server whose output writes stop half way (the PNG's temporary file is written, then it hangs):
# kill -9 lands between the image being made and its asset being stored.
_HANGING_STORE = """
import os, sys, time
from pathlib import Path
import paletta_server.storage.assets as assets

def hang(path, data):
    if path.suffix != ".json":
        Path(path.parent, ".tmp-crash").write_bytes(data[: len(data) // 2])
        Path(os.environ["PALETTA_TEST_MARK"]).touch()
        time.sleep(600)
    assets._original_atomic_write(path, data)

assets._original_atomic_write = assets._atomic_write
assets._atomic_write = hang
from paletta_server.config import load_config
from paletta_server.main import serve
serve(load_config(sys.argv[1], profile="tiny"))
"""


async def test_kill_9_while_an_output_is_stored_leaves_no_half_asset(tmp_path, tiny_models_dir):
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import link_tiny_models
    from tests.test_restart import free_port, start_server, wait_serving

    data, mark = tmp_path / "data", tmp_path / "storing"
    link_tiny_models(data, tiny_models_dir)
    port = free_port()
    env = {**os.environ, "PALETTA_PORT": str(port), "HF_HUB_OFFLINE": "1", "PALETTA_TEST_MARK": str(mark)}
    proc = subprocess.Popen([sys.executable, "-c", _HANGING_STORE, str(data)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        channel = await wait_serving(f"127.0.0.1:{port}")
        stream = generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(
            generate_pb2.GenerateRequest(**GEN))
        name = (await stream.read()).job
        for _ in range(600):
            if mark.exists():
                break
            await asyncio.sleep(0.1)
        assert mark.exists(), "the output write never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        await channel.close()
    finally:
        proc.kill()
    assert list((data / "assets").glob("*/.tmp-crash"))  # the half-written file is there …
    port = free_port()
    again = start_server(data, port)
    try:
        channel = await wait_serving(f"127.0.0.1:{port}")
        job = await job_service_pb2_grpc.JobServiceStub(channel).GetJob(job_service_pb2.GetJobRequest(name=name))
        assert job.state == job_pb2.JOB_STATE_FAILED and error_reason(job.error) == "INTERRUPTED"
        assert not job.outputs
        assert not list((data / "assets").glob("*/.tmp-*"))  # … and start-up removed it
        await channel.close()
    finally:
        again.terminate()
        again.wait(30)
