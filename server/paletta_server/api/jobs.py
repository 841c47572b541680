"""JobService: get, list, watch, cancel, approve."""

from __future__ import annotations

import asyncio

import grpc

from paletta.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from paletta_server.app import PalettaApp
from paletta_server.errors import invalid
from paletta_server.jobs.events import STATE_NAMES

PREFIX = "jobs/"


def job_id(name: str, field_name: str) -> str:
    if not name.startswith(PREFIX) or not name[len(PREFIX):].isalnum():
        raise invalid(field_name, f"{name!r} is not a job name of the form jobs/{{id}}")
    return name[len(PREFIX):]


def page_size(value: int) -> int:
    if not 0 <= value <= 1000:
        raise invalid("page_size", "must be in [0, 1000]")
    return value or 50


class JobServicer(job_service_pb2_grpc.JobServiceServicer):
    def __init__(self, app: PalettaApp):
        self.manager = app.manager

    async def GetJob(self, request: job_service_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> job_pb2.Job:
        return await asyncio.to_thread(self.manager.job, job_id(request.name, "name"))

    async def ListJobs(self, request: job_service_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
                       ) -> job_service_pb2.ListJobsResponse:
        states = []
        for i, state in enumerate(request.states):
            if state not in STATE_NAMES:
                raise invalid(f"states[{i}]", "not a job state")
            states.append(STATE_NAMES[state])
        jobs, token = await asyncio.to_thread(self.manager.list_jobs, states, request.capability,
                                              page_size(request.page_size), request.page_token)
        return job_service_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def WatchJob(self, request: job_service_pb2.WatchJobRequest, context: grpc.aio.ServicerContext):
        if request.after_seq < 0:
            raise invalid("after_seq", "must not be negative")
        async for event in self.manager.watch(job_id(request.name, "name"), request.after_seq):
            yield event

    async def CancelJob(self, request: job_service_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
                        ) -> job_pb2.Job:
        return await asyncio.to_thread(self.manager.cancel, job_id(request.name, "name"))

    async def ApproveOutput(self, request: job_service_pb2.ApproveOutputRequest,
                            context: grpc.aio.ServicerContext) -> job_pb2.Job:
        if request.index < 0:
            raise invalid("index", "must not be negative")
        return await asyncio.to_thread(self.manager.approve, job_id(request.name, "name"), request.index,
                                       request.approved)

    async def ListApprovedOutputs(self, request: job_service_pb2.ListApprovedOutputsRequest,
                                  context: grpc.aio.ServicerContext) -> job_service_pb2.ListApprovedOutputsResponse:
        rows, token = await asyncio.to_thread(self.manager.approved_outputs, page_size(request.page_size),
                                              request.page_token)
        return job_service_pb2.ListApprovedOutputsResponse(
            outputs=[job_service_pb2.ApprovedOutput(job=f"jobs/{row.id}", capability=row.capability, output=out)
                     for row, out in rows],
            next_page_token=token,
        )

