"""JobService and job semantics: cancel, watch/replay, re-attach, disconnects, listing, approval, queue bound.

Every test runs on both job stores: SQLite (embedded) and PostgreSQL (the shared queue, with this
server's device worker claiming through a PostgresLink and its watchers following NOTIFY).
"""

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from paletta.v1 import generate_pb2 as gen
from paletta.v1 import generate_service_pb2_grpc as gen_grpc
from paletta.v1 import job_options_pb2, job_pb2, job_service_pb2, job_service_pb2_grpc
from tests.helpers import collect, error_reason, field_violations, kinds
from tests.pg import both_stores

pytestmark = both_stores

SLOW = dict(prompt="slow", width=256, height=256, steps=100, seed=1)
QUICK = dict(prompt="quick", width=64, height=64, steps=1, seed=1)


async def first_denoise_step(stream) -> tuple[str, int]:
    while (event := await stream.read()) is not grpc.aio.EOF:
        if event.HasField("progress") and event.progress.stage == "denoising":
            return event.job, event.seq
    raise AssertionError("stream ended before denoising")


async def wait_state(jobs, name, state, timeout=60.0):
    for _ in range(int(timeout * 20)):
        job = await jobs.GetJob(job_service_pb2.GetJobRequest(name=name))
        if job.state == state:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never reached {state}: {job}")


async def test_cancel_running_job_stops_at_next_step(server):
    gen_stub = gen_grpc.GenerateServiceStub(server.channel)
    jobs = job_service_pb2_grpc.JobServiceStub(server.channel)
    stream = gen_stub.Generate(gen.GenerateRequest(**SLOW))
    name, _ = await first_denoise_step(stream)
    await jobs.CancelJob(job_service_pb2.CancelJobRequest(name=name))
    rest = await collect(stream)
    finished = rest[-1].finished.job
    assert finished.state == job_pb2.JOB_STATE_CANCELLED and not finished.outputs
    steps = [e.progress.step for e in rest if e.HasField("progress")]
    assert max(steps, default=0) < 100
    assert finished.error.code == grpc.StatusCode.CANCELLED.value[0]
    info = error_details_pb2.ErrorInfo()
    assert finished.error.details[0].Unpack(info) and info.reason == "CANCELLED" and info.domain == "paletta"
    # The worker is free again.
    events = await collect(gen_stub.Generate(gen.GenerateRequest(**QUICK)))
    assert events[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED


async def test_cancel_queued_job(server):
    gen_stub = gen_grpc.GenerateServiceStub(server.channel)
    jobs = job_service_pb2_grpc.JobServiceStub(server.channel)
    running = gen_stub.Generate(gen.GenerateRequest(**SLOW))
    running_name, _ = await first_denoise_step(running)
    queued = gen_stub.Generate(gen.GenerateRequest(**QUICK))
    first = await queued.read()
    assert first.HasField("queued") and first.queued.position >= 1
    cancelled = await jobs.CancelJob(job_service_pb2.CancelJobRequest(name=first.job))
    assert cancelled.state == job_pb2.JOB_STATE_CANCELLED
    rest = await collect(queued)
    assert kinds(rest) == ["finished"]
    await jobs.CancelJob(job_service_pb2.CancelJobRequest(name=running_name))
    await collect(running)


async def test_watch_replays_missed_events_then_follows(server):
    gen_stub = gen_grpc.GenerateServiceStub(server.channel)
    jobs = job_service_pb2_grpc.JobServiceStub(server.channel)
    stream = gen_stub.Generate(gen.GenerateRequest(**{**SLOW, "steps": 12, "width": 128, "height": 128}))
    name, seq = await first_denoise_step(stream)
    stream.cancel()  # the client drops; the job goes on
    watchers = [collect(jobs.WatchJob(job_service_pb2.WatchJobRequest(name=name, after_seq=seq))) for _ in range(3)]
    full = collect(jobs.WatchJob(job_service_pb2.WatchJobRequest(name=name)))
    results = await asyncio.gather(*watchers, full)
    for events in results[:3]:
        assert [e.seq for e in events] == list(range(seq + 1, seq + 1 + len(events)))
        assert events[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert [e.seq for e in results[3]] == list(range(1, results[3][-1].seq + 1))
    # After the job finished, a watch replays the same events and ends.
    late = await collect(jobs.WatchJob(job_service_pb2.WatchJobRequest(name=name, after_seq=seq)))
    assert [e.SerializeToString() for e in late] == [e.SerializeToString() for e in results[0]]
    # The stored log keeps every event but drops previews' pixels once the job is over (shared,
    # the janitor does it once front ends are done with them: LIVE_LOG_S later; here at once).
    await asyncio.to_thread(server.app.manager.strip_ended_previews, 0.0)
    stored = [job_pb2.JobEvent.FromString(d) for d in server.app.store.events_after(name[5:], 0)]
    assert [e.seq for e in stored] == [e.seq for e in results[3]]
    previews = [e for e in stored if e.HasField("preview")]
    assert previews and all(not e.preview.jpeg and e.preview.step for e in previews)
    assert any(e.preview.jpeg for e in results[3] if e.HasField("preview"))


async def test_disconnect_does_not_cancel_unless_asked(server):
    gen_stub = gen_grpc.GenerateServiceStub(server.channel)
    jobs = job_service_pb2_grpc.JobServiceStub(server.channel)
    keep = gen_stub.Generate(gen.GenerateRequest(**{**SLOW, "steps": 8, "width": 128, "height": 128}))
    keep_name, _ = await first_denoise_step(keep)
    keep.cancel()
    assert (await wait_state(jobs, keep_name, job_pb2.JOB_STATE_SUCCEEDED)).outputs
    drop = gen_stub.Generate(gen.GenerateRequest(**SLOW, options=job_options_pb2.JobOptions(cancel_on_disconnect=True)))
    drop_name, _ = await first_denoise_step(drop)
    drop.cancel()
    await wait_state(jobs, drop_name, job_pb2.JOB_STATE_CANCELLED)


async def test_repeated_request_id_reattaches(server):
    gen_stub = gen_grpc.GenerateServiceStub(server.channel)
    jobs = job_service_pb2_grpc.JobServiceStub(server.channel)
    req = gen.GenerateRequest(**{**SLOW, "steps": 6, "width": 128, "height": 128},
                              options=job_options_pb2.JobOptions(request_id="client-42"))
    first = gen_stub.Generate(req)
    name, _ = await first_denoise_step(first)
    again = await collect(gen_stub.Generate(req))
    assert {e.job for e in again} == {name}
    assert again[0].seq == 1 and again[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED
    await collect(first)
    listing = await jobs.ListJobs(job_service_pb2.ListJobsRequest())
    assert [j.name for j in listing.jobs if j.request_id == "client-42"] == [name]
    # Finished: the same id still returns the same job and its outputs, nothing new runs.
    replay = await collect(gen_stub.Generate(req))
    assert {e.job for e in replay} == {name}
    assert server.app.store.count("SUCCEEDED") == 1


async def test_list_jobs_pages_and_filters(server):
    gen_stub = gen_grpc.GenerateServiceStub(server.channel)
    jobs = job_service_pb2_grpc.JobServiceStub(server.channel)
    names = []
    for i in range(5):
        events = await collect(gen_stub.Generate(gen.GenerateRequest(**{**QUICK, "seed": i})))
        names.append(events[0].job)
    page1 = await jobs.ListJobs(job_service_pb2.ListJobsRequest(page_size=2))
    page2 = await jobs.ListJobs(job_service_pb2.ListJobsRequest(page_size=2, page_token=page1.next_page_token))
    page3 = await jobs.ListJobs(job_service_pb2.ListJobsRequest(page_size=2, page_token=page2.next_page_token))
    listed = [j.name for j in (*page1.jobs, *page2.jobs, *page3.jobs)]
    assert listed == names[::-1] and page3.next_page_token == ""
    done = await jobs.ListJobs(job_service_pb2.ListJobsRequest(states=[job_pb2.JOB_STATE_SUCCEEDED]))
    assert len(done.jobs) == 5 and all(j.outputs for j in done.jobs)
    none = await jobs.ListJobs(job_service_pb2.ListJobsRequest(states=[job_pb2.JOB_STATE_FAILED]))
    assert list(none.jobs) == []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.ListJobs(job_service_pb2.ListJobsRequest(page_token="garbage!"))
    assert "page_token" in field_violations(err.value)


async def test_approve_outputs_and_list_them(server):
    gen_stub = gen_grpc.GenerateServiceStub(server.channel)
    jobs = job_service_pb2_grpc.JobServiceStub(server.channel)
    events = await collect(gen_stub.Generate(gen.GenerateRequest(**{**QUICK, "variants": 3})))
    name = events[0].job
    job = await jobs.ApproveOutput(job_service_pb2.ApproveOutputRequest(name=name, index=1, approved=True))
    assert [o.approved for o in job.outputs] == [False, True, False]
    approved = await jobs.ListApprovedOutputs(job_service_pb2.ListApprovedOutputsRequest())
    assert [(a.job, a.output.index) for a in approved.outputs] == [(name, 1)]
    assert approved.outputs[0].output.asset.name == job.outputs[1].asset.name
    await jobs.ApproveOutput(job_service_pb2.ApproveOutputRequest(name=name, index=1, approved=False))
    assert not (await jobs.ListApprovedOutputs(job_service_pb2.ListApprovedOutputsRequest())).outputs
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.ApproveOutput(job_service_pb2.ApproveOutputRequest(name=name, index=7, approved=True))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "index" in field_violations(err.value)


async def test_unknown_and_malformed_job_names(server):
    jobs = job_service_pb2_grpc.JobServiceStub(server.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.GetJob(job_service_pb2.GetJobRequest(name="jobs/" + "f" * 32))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "name" in field_violations(err.value)
    for unknown in (jobs.CancelJob(job_service_pb2.CancelJobRequest(name="jobs/" + "f" * 32)),
                    jobs.ApproveOutput(job_service_pb2.ApproveOutputRequest(name="jobs/" + "f" * 32))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unknown
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "name" in field_violations(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.GetJob(job_service_pb2.GetJobRequest(name="jobs/../x"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "name" in field_violations(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(jobs.WatchJob(job_service_pb2.WatchJobRequest(name="jobs/" + "e" * 32)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "name" in field_violations(err.value)


async def test_full_queue_answers_resource_exhausted_with_retry_info(server_factory):
    handle = await server_factory(max_queue=2)
    gen_stub = gen_grpc.GenerateServiceStub(handle.channel)
    running = gen_stub.Generate(gen.GenerateRequest(**SLOW))
    await first_denoise_step(running)
    waiting = [gen_stub.Generate(gen.GenerateRequest(**QUICK)) for _ in range(2)]
    for w in waiting:
        assert (await w.read()).HasField("queued")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(gen_stub.Generate(gen.GenerateRequest(**QUICK)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(err.value) == "QUEUE_FULL"
    status = rpc_status.from_call(err.value)
    retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert retry
    info = error_details_pb2.RetryInfo()
    retry[0].Unpack(info)
    assert info.retry_delay.seconds >= 1
    running.cancel()
    jobs = job_service_pb2_grpc.JobServiceStub(handle.channel)
    for job in (await jobs.ListJobs(job_service_pb2.ListJobsRequest())).jobs:
        await jobs.CancelJob(job_service_pb2.CancelJobRequest(name=job.name))


async def test_twenty_concurrent_clients(server):
    async def one(i: int):
        channel = grpc.aio.insecure_channel(server.address)
        try:
            stub = gen_grpc.GenerateServiceStub(channel)
            return await collect(stub.Generate(gen.GenerateRequest(**{**QUICK, "seed": i})))
        finally:
            await channel.close()

    results = await asyncio.gather(*(one(i) for i in range(20)))
    assert len({r[0].job for r in results}) == 20
    for i, events in enumerate(results):
        assert events[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED
        assert [e.output.seed for e in events if e.HasField("output")] == [i]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_paging_is_stable_while_new_jobs_arrive(server):
    gen_stub = gen_grpc.GenerateServiceStub(server.channel)
    jobs = job_service_pb2_grpc.JobServiceStub(server.channel)
    names = [(await collect(gen_stub.Generate(gen.GenerateRequest(**{**QUICK, "seed": i}))))[0].job for i in range(4)]
    page1 = await jobs.ListJobs(job_service_pb2.ListJobsRequest(page_size=2))
    await collect(gen_stub.Generate(gen.GenerateRequest(**{**QUICK, "seed": 99})))  # arrives between pages
    page2 = await jobs.ListJobs(job_service_pb2.ListJobsRequest(page_size=2, page_token=page1.next_page_token))
    assert [j.name for j in (*page1.jobs, *page2.jobs)] == names[::-1] and page2.next_page_token == ""
