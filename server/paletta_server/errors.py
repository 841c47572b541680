"""Domain errors, and the one function that turns any of them into a ``google.rpc.Status``.

Every layer raises these. ``to_status`` builds the Status with ``ErrorInfo{reason, domain
"paletta", metadata}`` plus ``BadRequest`` (field violations) and ``RetryInfo`` where they apply;
the api layer sends it as the call's status and the job store keeps it, serialized, as a failed
job's error, so a job that fails later keeps its violations and metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "paletta"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, named by its proto path (e.g. ``styles[0].weight``)."""

    field: str
    description: str


class PalettaError(Exception):
    """Base of all domain errors; ``reason`` is the ErrorInfo reason clients switch on."""

    code = "INTERNAL"  # canonical gRPC code name
    reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None,
                 violations: list[FieldViolation] | None = None):
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        self.metadata = metadata or {}
        # Fields the error is about; sent as google.rpc.BadRequest whatever the code.
        self.violations = violations or []


class InvalidArgument(PalettaError):
    """The request is malformed; ``violations`` name the fields."""

    code = "INVALID_ARGUMENT"  # canonical gRPC code name
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation] | FieldViolation, *, reason: str | None = None):
        items = [violations] if isinstance(violations, FieldViolation) else list(violations)
        text = "; ".join(f"{v.field}: {v.description}" for v in items)
        super().__init__(text, reason=reason, violations=items)


def invalid(field_name: str, description: str) -> InvalidArgument:
    """Shorthand for a one-field InvalidArgument."""
    return InvalidArgument(FieldViolation(field_name, description))


class NotFound(PalettaError):
    """A named resource (job, asset, model, style) does not exist."""

    code = "NOT_FOUND"  # canonical gRPC code name
    reason = "NOT_FOUND"


class FailedPrecondition(PalettaError):
    """The system is not in a state to do this (model missing, CUDA missing, job not finished)."""

    code = "FAILED_PRECONDITION"  # canonical gRPC code name
    reason = "FAILED_PRECONDITION"


class ResourceExhausted(PalettaError):
    """A limit was hit (queue full, upload too large, out of memory)."""

    code = "RESOURCE_EXHAUSTED"  # canonical gRPC code name
    reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, reason: str | None = None, retry_after_s: float | None = None,
                 violations: list[FieldViolation] | None = None):
        super().__init__(message, reason=reason, violations=violations)
        self.retry_after_s = retry_after_s


class Unauthenticated(PalettaError):
    """The call carried no bearer token, or the wrong one."""

    code = "UNAUTHENTICATED"  # canonical gRPC code name
    reason = "UNAUTHENTICATED"


class Unimplemented(PalettaError):
    """The method does not exist on this server (an unknown service, or a newer client)."""

    code = "UNIMPLEMENTED"  # canonical gRPC code name
    reason = "UNIMPLEMENTED"


class MalformedRequest(PalettaError):
    """The request's bytes do not parse as its message (bad UTF-8 in a string, truncated data)."""

    code = "INVALID_ARGUMENT"  # canonical gRPC code name
    reason = "MALFORMED_REQUEST"


class ModelUnavailable(FailedPrecondition):
    """A model's weights are neither on disk nor downloadable."""

    reason = "MODEL_UNAVAILABLE"


class Interrupted(PalettaError):
    """The server stopped (or crashed) while the job was running."""

    code = "ABORTED"
    reason = "INTERRUPTED"


class EngineError(PalettaError):
    """An engine raised something unexpected; the message names the exception."""

    code = "INTERNAL"
    reason = "ENGINE_ERROR"


class JobCancelled(PalettaError):
    """Raised inside a running job (from a step callback) when its cancellation was requested;
    also the error a cancelled job records."""

    code = "CANCELLED"
    reason = "CANCELLED"


def _pack(message: Message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


# A call's status travels in its trailers, which clients cap (grpc: 8 KiB by default); errors quote
# what the caller sent (names, text), so there every quoted piece is clipped to keep the status well
# inside. A job's stored error (Job.error, the finished event) is a message field: kept whole.
MESSAGE_BYTES = 512
VIOLATION_BYTES = 1536  # all field violations together
METADATA_BYTES = 256  # each ErrorInfo metadata value


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, marked with "…" where it was cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[:limit - 3].decode(errors="ignore") + "…"


def _violations(violations: list[FieldViolation]) -> list[error_details_pb2.BadRequest.FieldViolation]:
    kept, left = [], VIOLATION_BYTES
    for i, v in enumerate(violations):
        field, description = clip(v.field, 128), clip(v.description, 256)
        size = len(field.encode()) + len(description.encode())
        if size > left:
            kept.append(error_details_pb2.BadRequest.FieldViolation(
                field="…", description=f"and {len(violations) - i} more, not sent"))
            break
        kept.append(error_details_pb2.BadRequest.FieldViolation(field=field, description=description))
        left -= size
    return kept


def to_status(exc: PalettaError, *, for_trailers: bool = False) -> status_pb2.Status:
    """The google.rpc.Status of a domain error: ErrorInfo always, BadRequest and RetryInfo when they
    apply; ``for_trailers``: clipped to be sent as a call's status."""
    metadata = {key: clip(value, METADATA_BYTES) if for_trailers else value for key, value in exc.metadata.items()}
    details = [_pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=metadata))]
    if exc.violations:
        violations = _violations(exc.violations) if for_trailers else [
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in exc.violations]
        details.append(_pack(error_details_pb2.BadRequest(field_violations=violations)))
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    message = clip(exc.message, MESSAGE_BYTES) if for_trailers else exc.message
    return status_pb2.Status(code=code_pb2.Code.Value(exc.code), message=message, details=details)
