"""Paletta Python SDK: typed sync and asyncio clients for the Paletta gRPC image server.

Example::

    import paletta

    client = paletta.Client("127.0.0.1:50051")
    client.edit("street.jpg", "make it night").image().save("night.png")

    job = client.generate("a knight in a misty forest", seed=7, variants=2)
    for p in job.progress():
        print(p.stage, p.step, p.total, p.variant)
    for i, image in enumerate(job.images()):
        image.save(f"knight-{i}.png")

    print(client.caption("knight-0.png").result().text)    # a typed Caption

    async with paletta.AsyncClient("127.0.0.1:50051") as aclient:
        night = await aclient.edit("street.jpg", "make it night").image()
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
from paletta.results import (
    Box,
    Caption,
    Detection,
    Detections,
    FaceIdentity,
    Progress,
    PromptExpansion,
    Result,
    Segmentation,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "AlreadyExists",
    "AsyncClient",
    "AsyncJobHandle",
    "Box",
    "Caption",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "Detection",
    "Detections",
    "FaceIdentity",
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
    "Progress",
    "PromptExpansion",
    "ResourceExhausted",
    "Result",
    "Segmentation",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]
