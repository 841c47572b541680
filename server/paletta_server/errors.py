"""Domain errors. Every layer raises these; api/errors.py maps them to gRPC statuses in one place."""

from __future__ import annotations

from dataclasses import dataclass


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


class JobCancelled(Exception):
    """Raised inside a running job (from a step callback) when its cancellation was requested."""
