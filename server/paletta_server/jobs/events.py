"""Building JobEvent / Job messages from stored rows (the contract is also the record format)."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from paletta.v1 import job_pb2, job_spec_pb2
from paletta_server.jobs.state import JobState
from paletta_server.jobs.store import JobRow, OutputRow

_STATES = {state.value: getattr(job_pb2, f"JOB_STATE_{state.value}") for state in JobState}
STATE_NAMES = {v: k for k, v in _STATES.items()}


def job_name(job_id: str) -> str:
    return f"jobs/{job_id}"


def timestamp(value: datetime | None = None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime((value or datetime.now(UTC)).replace(tzinfo=UTC))
    return ts


def job_message(row: JobRow, outputs: list[OutputRow]) -> job_pb2.Job:
    job = job_pb2.Job(
        name=job_name(row.id), capability=row.capability, state=_STATES[row.state], priority=row.priority,
        request_id=row.request_id or "", create_time=timestamp(row.created), last_seq=row.last_seq,
        spec=job_spec_pb2.JobSpec.FromString(row.spec),
    )
    if row.started:
        job.start_time.CopyFrom(timestamp(row.started))
    if row.ended:
        job.end_time.CopyFrom(timestamp(row.ended))
    if row.error:
        job.error.ParseFromString(row.error)
    for out in outputs:
        output = job.outputs.add()
        output.ParseFromString(out.data)
        output.approved = out.approved
    return job
