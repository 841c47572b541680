"""Building JobEvent / Job messages from stored rows (the contract is also the record format)."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from paletta.v1 import job_pb2
from paletta_server.jobs.store import JobRow, OutputRow

DOMAIN = "paletta"
_STATES = {
    "QUEUED": job_pb2.JOB_STATE_QUEUED,
    "RUNNING": job_pb2.JOB_STATE_RUNNING,
    "SUCCEEDED": job_pb2.JOB_STATE_SUCCEEDED,
    "FAILED": job_pb2.JOB_STATE_FAILED,
    "CANCELLED": job_pb2.JOB_STATE_CANCELLED,
}
STATE_NAMES = {v: k for k, v in _STATES.items()}


def job_name(job_id: str) -> str:
    return f"jobs/{job_id}"


def timestamp(value: datetime | None = None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime((value or datetime.now(UTC)).replace(tzinfo=UTC))
    return ts


def rpc_status(code_name: str, message: str, reason: str, metadata: dict[str, str] | None = None) -> status_pb2.Status:
    """A google.rpc.Status carrying ErrorInfo{reason, domain "paletta"}."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata or {})
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=code_pb2.Code.Value(code_name), message=message, details=[detail])


def job_message(row: JobRow, outputs: list[OutputRow]) -> job_pb2.Job:
    job = job_pb2.Job(
        name=job_name(row.id), capability=row.capability, state=_STATES[row.state], priority=row.priority,
        request_id=row.request_id or "", create_time=timestamp(row.created), last_seq=row.last_seq,
    )
    if row.started:
        job.start_time.CopyFrom(timestamp(row.started))
    if row.ended:
        job.end_time.CopyFrom(timestamp(row.ended))
    if row.error_code:
        job.error.CopyFrom(rpc_status(row.error_code, row.error_message, row.error_reason))
    for out in outputs:
        output = job.outputs.add()
        output.ParseFromString(out.data)
        output.approved = out.approved
    return job
