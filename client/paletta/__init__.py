"""Paletta Python SDK: typed sync and asyncio clients for the Paletta gRPC image server.

Example::

    import paletta

    client = paletta.Client("127.0.0.1:50051")
    job = client.generate("a knight in a misty forest", seed=7)
    for event in job:
        if event.HasField("progress"):
            print(event.progress.stage, event.progress.step, event.progress.total_steps)
    job.image().save("knight.png")
"""

from paletta._common import DEFAULT_ADDRESS, ImageInput
from paletta.aio import AsyncClient, AsyncJobHandle
from paletta.client import Client, JobHandle
from paletta.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    JobCancelled,
    JobFailed,
    NotFound,
    PalettaError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "AlreadyExists",
    "AsyncClient",
    "AsyncJobHandle",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "ImageInput",
    "Internal",
    "InvalidArgument",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "NotFound",
    "PalettaError",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]
