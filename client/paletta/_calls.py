"""Calls described as data, built once for both clients and sent by their transports.

A :class:`JobCall` is a capability request still to submit: the RPC, the request (job options
included), the image arguments to upload into it and the jobs it depends on. An :class:`Rpc`
is a unary call with its response type; a :class:`Pager` walks a paged list call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from paletta import _common as c
from paletta.errors import PalettaError
from paletta.v1 import (
    asset_service_pb2,
    image_pb2,
    job_options_pb2,
    job_pb2,
    job_service_pb2,
    style_service_pb2,
    system_service_pb2,
)

R = TypeVar("R")
T = TypeVar("T")


def job_options(
    request_id: str | None, priority: int | str | None, cancel_on_disconnect: bool
) -> job_options_pb2.JobOptions:
    """The ``options`` (field 100) every capability request carries."""
    return job_options_pb2.JobOptions(
        request_id=request_id or "",
        priority=c.priority(priority),  # type: ignore[arg-type]  # an int of the enum
        cancel_on_disconnect=cancel_on_disconnect,
    )


@dataclass(frozen=True)
class ImageSlot:
    """An ImageRef field of a request still to fill: ``getattr(parent, field)``, from ``value``."""

    parent: Message
    field: str
    value: c.ImageInput

    def fill(self, ref: image_pb2.ImageRef) -> None:
        getattr(self.parent, self.field).CopyFrom(ref)


@dataclass(frozen=True)
class Dependency:
    """A job to run first whose first output asset fills ``getattr(parent, field)`` (the auto-mask)."""

    call: JobCall[Any]
    parent: Message
    field: str

    def fill(self, job: job_pb2.Job) -> None:
        assets = [o.asset.name for o in job.outputs if o.asset.name]
        if not assets:
            raise PalettaError(f"job {job.name} made no image for {self.field}")
        getattr(self.parent, self.field).CopyFrom(image_pb2.ImageRef(asset=assets[0]))


@dataclass(frozen=True)
class JobCall(Generic[R]):
    """A capability call: ``service.method(request)``; ``R`` is the type of its typed results."""

    service: str
    method: str
    request: Message
    images: list[ImageSlot] = field(default_factory=list)
    dependencies: list[Dependency] = field(default_factory=list)


@dataclass(frozen=True)
class Rpc(Generic[T]):
    """A unary call ``service.method(request)`` answering ``T``; ``unwrap`` picks the value to return."""

    service: str
    method: str
    request: Message
    unwrap: Callable[[Any], T] = lambda response: response  # noqa: E731 - identity


# -- the unary calls of both clients ----------------------------------------------------------------


def get_job(name: c.JobRef) -> Rpc[job_pb2.Job]:
    return Rpc("JobService", "GetJob", job_service_pb2.GetJobRequest(name=c.job_name(name)))


def cancel_job(name: c.JobRef) -> Rpc[job_pb2.Job]:
    return Rpc("JobService", "CancelJob", job_service_pb2.CancelJobRequest(name=c.job_name(name)))


def approve_output(job: c.JobRef, index: int, approved: bool) -> Rpc[job_pb2.Job]:
    request = job_service_pb2.ApproveOutputRequest(name=c.job_name(job), index=index, approved=approved)
    return Rpc("JobService", "ApproveOutput", request)


def get_asset(name: str | image_pb2.Asset) -> Rpc[image_pb2.Asset]:
    return Rpc("AssetService", "GetAsset", asset_service_pb2.GetAssetRequest(name=c.asset_name(name)))


def get_status() -> Rpc[system_service_pb2.GetStatusResponse]:
    return Rpc("SystemService", "GetStatus", system_service_pb2.GetStatusRequest())


def list_models() -> Rpc[list[system_service_pb2.ModelInfo]]:
    return Rpc("SystemService", "ListModels", system_service_pb2.ListModelsRequest(), lambda r: list(r.models))


def unload_models(keys: Iterable[str]) -> Rpc[system_service_pb2.UnloadModelsResponse]:
    return Rpc("SystemService", "UnloadModels", system_service_pb2.UnloadModelsRequest(keys=list(keys)))


def list_styles() -> Rpc[list[style_service_pb2.Style]]:
    return Rpc("StyleService", "ListStyles", style_service_pb2.ListStylesRequest(), lambda r: list(r.styles))


# -- paging ---------------------------------------------------------------------------------------


class Pager(Generic[T]):
    """A paged JobService list call without I/O: the next request, each page's items, when to stop.

    ``limit`` None means every page.
    """

    def __init__(self, rpc: Rpc[Any], items: Callable[[Any], Iterable[T]], limit: int | None = None) -> None:
        self.rpc = rpc
        self.items = items
        self.limit = limit
        self.count = 0
        self.done = False
        rpc.request.page_size = min(limit or 0, 1000)  # type: ignore[attr-defined]

    def feed(self, page: Any) -> list[T]:
        """The items of a page to hand out (cut at ``limit``); then ``done`` says whether to stop."""
        items = list(self.items(page))
        if self.limit is not None:
            items = items[: max(self.limit - self.count, 0)]
        self.count += len(items)
        token: str = page.next_page_token
        self.done = not token or (self.limit is not None and self.count >= self.limit)
        self.rpc.request.page_token = token  # type: ignore[attr-defined]
        return items


def list_jobs(states: Iterable[int | str], capability: str, limit: int | None) -> Pager[job_pb2.Job]:
    request = job_service_pb2.ListJobsRequest(
        states=[c.job_state(s) for s in states],  # type: ignore[misc]  # ints of the enum
        capability=capability,
    )
    return Pager(Rpc("JobService", "ListJobs", request), lambda page: page.jobs, limit)


def list_approved(limit: int | None) -> Pager[job_service_pb2.ApprovedOutput]:
    request = job_service_pb2.ListApprovedOutputsRequest()
    return Pager(Rpc("JobService", "ListApprovedOutputs", request), lambda page: page.outputs, limit)
