"""Errors raised by the SDK: every ``grpc.RpcError`` becomes a :class:`PalettaError` subclass.

The server describes errors with a ``google.rpc.Status`` carrying an ``ErrorInfo`` (``reason``,
domain ``"paletta"``), ``BadRequest`` field violations and ``RetryInfo``; this module turns
those into attributes so callers switch on types and ``reason``, never on message text.

Example::

    try:
        client.generate("", width=17).wait()
    except paletta.InvalidArgument as err:
        for violation in err.field_violations:
            print(violation.field, violation.description)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:
    from paletta.v1 import job_pb2

_DETAILS_KEY = "grpc-status-details-bin"
_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field, named by its proto path (e.g. ``styles[0].weight``)."""

    field: str
    description: str


class PalettaError(Exception):
    """Base of every SDK error.

    Attributes: ``code`` (``grpc.StatusCode``), ``message``, ``reason`` (the ErrorInfo reason,
    e.g. ``"QUEUE_FULL"``; empty if the server sent none), ``metadata`` (ErrorInfo metadata),
    ``field_violations`` and ``retry_delay`` (seconds, or ``None``).
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: list[FieldViolation] | None = None,
        retry_delay: float | None = None,
    ) -> None:
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations or [])
        self.retry_delay = retry_delay
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"{self.code.name}: {self.message}" if self.message else self.code.name
        if self.reason and self.reason != self.code.name:
            text += f" [{self.reason}]"
        return text


class InvalidArgument(PalettaError):
    """The request was rejected; ``field_violations`` name the bad fields."""

    def _render(self) -> str:
        if not self.field_violations:
            return super()._render()
        fields = "; ".join(f"{v.field}: {v.description}" for v in self.field_violations)
        return f"INVALID_ARGUMENT: {fields}"


class NotFound(PalettaError):
    """A named job, asset, model or style does not exist."""


class AlreadyExists(PalettaError):
    """The resource already exists."""


class FailedPrecondition(PalettaError):
    """The server cannot do this now (a model is missing, a job is not finished, …)."""


class ResourceExhausted(PalettaError):
    """A limit was hit (queue full, upload too large, out of memory); see ``retry_delay``."""


class Unauthenticated(PalettaError):
    """The bearer token is missing or wrong."""


class PermissionDenied(PalettaError):
    """The caller may not do this."""


class Unavailable(PalettaError):
    """The server cannot be reached."""


class DeadlineExceeded(PalettaError):
    """The call ran past its deadline."""


class Cancelled(PalettaError):
    """The call was cancelled."""


class Internal(PalettaError):
    """The server failed unexpectedly."""


class JobFailed(PalettaError):
    """A job ended FAILED (or CANCELLED, see :class:`JobCancelled`); ``job`` is its final state.

    ``code`` and ``reason`` come from ``job.error`` (e.g. ``reason == "OUT_OF_MEMORY"``).
    """

    def __init__(self, job: job_pb2.Job, **kwargs: Any) -> None:
        self.job = job
        super().__init__(**kwargs)

    def _render(self) -> str:
        return f"job {self.job.name} failed: {super()._render()}"


class JobCancelled(JobFailed):
    """A job ended CANCELLED."""

    def _render(self) -> str:
        return f"job {self.job.name} was cancelled"


_BY_CODE: dict[grpc.StatusCode, type[PalettaError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: Internal,
}


def status_code(value: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` for a numeric ``google.rpc.Code`` (UNKNOWN if out of range)."""
    return _CODES_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


def _details(status: status_pb2.Status) -> dict[str, Any]:
    """Unpack the ErrorInfo, BadRequest and RetryInfo details of a rich status."""
    out: dict[str, Any] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out["reason"] = info.reason
            out["metadata"] = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.setdefault("field_violations", []).extend(
                FieldViolation(v.field, v.description) for v in bad.field_violations
            )
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out["retry_delay"] = retry.retry_delay.ToTimedelta().total_seconds()
    return out


def _rich_status(err: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status in the call's trailing metadata, if any."""
    try:
        from grpc_status import rpc_status

        status: status_pb2.Status | None = rpc_status.from_call(err)  # type: ignore[arg-type]
        return status
    except ValueError:
        pass  # code or message differ from the status proto: trust the proto's details anyway
    except Exception:  # noqa: BLE001 - a call object without metadata; fall through
        return None
    metadata: Any = err.trailing_metadata() or ()
    for key, value in metadata:
        if key == _DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    return None


def from_rpc_error(err: grpc.RpcError) -> PalettaError:
    """Convert a ``grpc.RpcError`` (sync or ``grpc.aio``) into the matching :class:`PalettaError`."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else str(err)) or ""
    status = _rich_status(err)
    extra = _details(status) if status is not None else {}
    if status is not None and status.message:
        message = status.message
    cls = _BY_CODE.get(code, PalettaError)
    error = cls(message, code=code, **extra)
    error.__cause__ = err
    return error


def from_status(status: status_pb2.Status, job: job_pb2.Job) -> JobFailed:
    """The :class:`JobFailed` (or :class:`JobCancelled`) for a finished job's ``error``."""
    code = status_code(status.code)
    cls = JobCancelled if code == grpc.StatusCode.CANCELLED else JobFailed
    return cls(job, message=status.message, code=code, **_details(status))
