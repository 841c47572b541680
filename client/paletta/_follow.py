"""Following a job, without I/O: one state machine that the sync and async handles both drive.

The handle asks :meth:`JobFollower.next_action` what to do and reports what happened:

====================  ==============================================  ===========================
action                the transport does                              then reports
====================  ==============================================  ===========================
:class:`Submit`       upload images, run dependencies, open the RPC   ``opened()`` / ``on_error``
:class:`Read`         read the next message of the open stream        ``on_event`` / ``on_end`` /
                                                                      ``on_error``
:class:`Watch`        sleep ``delay``, open ``WatchJob(request)``     ``opened()`` / ``on_error``
:class:`FetchJob`     ``GetJob(request)`` (a stream ended early)      ``on_job`` / ``on_error``
:class:`Finished`     nothing: the job is over (any final state)      -
:class:`Raise`        raise ``error``                                 -
====================  ==============================================  ===========================

New events become :class:`Update` objects in ``pending``; replayed duplicates are dropped.
A transport error (UNAVAILABLE, INTERNAL, ABORTED) after the job has a name re-attaches with
``WatchJob(name, after_seq = last seen seq)`` after an exponential backoff, bounded by
``reconnect_timeout`` seconds since the first failure in a row; any other error is raised.
"""

from __future__ import annotations

import io
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
from PIL import Image

from paletta.errors import JobCancelled, JobFailed, PalettaError, from_status
from paletta.results import Progress
from paletta.v1 import job_pb2, job_service_pb2

T = TypeVar("T")

TERMINAL_STATES = frozenset({job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED})
# Codes after which a stream is worth re-attaching to: the job goes on on the server.
REATTACH_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED})


# -- actions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submit(Generic[T]):
    """Start the job: resolve the call's images and dependencies, then open its capability RPC."""

    call: T


@dataclass(frozen=True)
class Read:
    """Read the next event of the open stream."""


@dataclass(frozen=True)
class Watch:
    """Wait ``delay`` seconds, then open ``JobService.WatchJob(request)``."""

    request: job_service_pb2.WatchJobRequest
    delay: float


@dataclass(frozen=True)
class FetchJob:
    """Call ``JobService.GetJob(request)``: the stream ended without a finished event."""

    request: job_service_pb2.GetJobRequest


@dataclass(frozen=True)
class Finished:
    """The job is over; ``job`` is its final state (succeeded, failed or cancelled)."""

    job: job_pb2.Job


@dataclass(frozen=True)
class Raise:
    """Give up following: raise ``error``."""

    error: PalettaError


Action = Submit[Any] | Read | Watch | FetchJob | Finished | Raise


@dataclass(frozen=True)
class Update:
    """One new event, with what it means: typed progress, or a stored output."""

    event: job_pb2.JobEvent
    progress: Progress | None = None
    output: job_pb2.JobOutput | None = None


# -- backoff --------------------------------------------------------------------------------------


class Backoff:
    """Exponential delays between re-attach attempts, bounded by a total time since the first failure."""

    def __init__(
        self, timeout: float, first: float = 0.05, cap: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.timeout = timeout
        self.first = first
        self.cap = cap
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.attempt = 0
        self.started: float | None = None

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None once the time is spent."""
        now = self.clock()
        if self.started is None:
            self.started = now
        if now - self.started >= self.timeout:
            return None
        delay = min(self.first * 2.0**self.attempt, self.cap)
        self.attempt += 1
        return delay


# -- the state machine ----------------------------------------------------------------------------


def decode_preview(jpeg: bytes) -> Image.Image | None:
    """A preview's pixels; None when the stored log kept only its place (an empty JPEG) or it is corrupt."""
    if not jpeg:
        return None
    try:
        image = Image.open(io.BytesIO(jpeg))
        image.load()
    except (OSError, SyntaxError):
        return None
    return image


@dataclass
class JobFollower:
    """The state of following one job: what was seen, what to do next.

    ``call`` is the capability call still to submit (None to follow an existing job by
    ``name`` from ``after_seq``).
    """

    name: str = ""
    after_seq: int = 0
    call: Any = None
    reconnect_timeout: float = 30.0
    clock: Callable[[], float] = time.monotonic
    last_seq: int = field(init=False)
    outputs: dict[int, job_pb2.JobOutput] = field(init=False, default_factory=dict)
    final: job_pb2.Job | None = field(init=False, default=None)
    pending: deque[Update] = field(init=False, default_factory=deque)
    reattach_count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.last_seq = self.after_seq
        self._backoff = Backoff(self.reconnect_timeout, clock=self.clock)
        self._next: Action = Submit(self.call) if self.call is not None else self._watch(0.0)
        self._stage = ""
        self._total = 0
        self._model = ""
        self._pipeline_step: int | None = None
        self._variant = 0

    # What to do next.

    def next_action(self) -> Action:
        return self._next

    @property
    def done(self) -> bool:
        """Whether the job's end has been seen."""
        return self.final is not None

    # What happened.

    def opened(self) -> None:
        """The capability call or WatchJob stream is open."""
        self._next = Read()

    def on_event(self, event: job_pb2.JobEvent) -> Update | None:
        """Record an event; the Update (also queued in ``pending``), or None for a replayed duplicate."""
        if event.seq and event.seq <= self.last_seq:
            return None
        self._backoff.reset()
        if event.job:
            self.name = event.job
        self.last_seq = max(self.last_seq, event.seq)
        update = self._interpret(event)
        self.pending.append(update)
        if self.final is not None:
            self._next = Finished(self.final)
        return update

    def on_end(self) -> None:
        """The stream ended without a finished event: ask for the job (or give up if it has no name)."""
        if not self.name:
            error = PalettaError("the server ended the job stream without any event")
            self._next = Raise(error)
            return
        self._next = FetchJob(job_service_pb2.GetJobRequest(name=self.name))

    def on_error(self, error: PalettaError) -> None:
        """A call failed: re-attach after a transport error on a named job, else raise it."""
        delay = self._backoff.next_delay() if self.name and error.code in REATTACH_CODES else None
        if delay is None:
            self._next = Raise(error)
            return
        self.reattach_count += 1
        self._next = self._watch(delay)

    def on_job(self, job: job_pb2.Job) -> None:
        """The GetJob answer after a stream ended early: the end if the job is over, else re-attach."""
        if job.state in TERMINAL_STATES:
            self._finish(job)
            self._next = Finished(job)
        else:  # still running (the server may be shutting down): re-attach after a pause
            self.on_error(PalettaError("job stream ended early", code=grpc.StatusCode.UNAVAILABLE))

    # Results.

    def outputs_in_order(self) -> list[job_pb2.JobOutput]:
        return [self.outputs[i] for i in sorted(self.outputs)]

    def check(self) -> job_pb2.Job:
        """The final job; raises JobFailed / JobCancelled (with the job's error details) unless it succeeded."""
        if self.final is None:
            raise PalettaError(f"job {self.name} has not finished", code=grpc.StatusCode.FAILED_PRECONDITION)
        job = self.final
        if job.state == job_pb2.JOB_STATE_SUCCEEDED:
            return job
        if job.HasField("error") and job.error.code:
            raise from_status(job.error, job)
        if job.state == job_pb2.JOB_STATE_CANCELLED:
            raise JobCancelled(job, message="cancelled", code=grpc.StatusCode.CANCELLED)
        state = job_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
        raise JobFailed(job, message=f"ended in state {state}", code=grpc.StatusCode.UNKNOWN)

    # Internals.

    def _watch(self, delay: float) -> Watch:
        return Watch(job_service_pb2.WatchJobRequest(name=self.name, after_seq=self.last_seq), delay)

    def _finish(self, job: job_pb2.Job) -> None:
        self.final = job
        for output in job.outputs:
            self.outputs.setdefault(output.index, output)

    def _interpret(self, event: job_pb2.JobEvent) -> Update:
        kind = event.WhichOneof("kind")
        if kind == "queued":
            position = event.queued.position
            return Update(event, Progress("queued", 0, 0, self._variant, self._pipeline_step, queue_position=position))
        if kind == "progress":
            p = event.progress
            if p.stage == "pipeline":
                self._pipeline_step = p.step
                self._variant = 0
            self._stage, self._total, self._model = p.stage, p.total_steps, p.model
            return Update(event, self._progress(p.step))
        if kind == "preview":
            return Update(event, self._progress(event.preview.step, decode_preview(event.preview.jpeg)))
        if kind == "output":
            self.outputs[event.output.index] = event.output
            self._variant += 1
            return Update(event, output=event.output)
        if kind == "finished":
            self._finish(event.finished.job)
        return Update(event)

    def _progress(self, step: int, preview: Image.Image | None = None) -> Progress:
        return Progress(self._stage, step, self._total, self._variant, self._pipeline_step, preview, self._model)


def new_outputs(follower: JobFollower, updates: Iterator[Update]) -> Iterator[job_pb2.JobOutput]:
    """Each output once, in arrival order: those already seen, then new ones, then any only in the final job."""
    seen: set[int] = set()
    for output in follower.outputs_in_order():
        seen.add(output.index)
        yield output
    for update in updates:
        if update.output is not None and update.output.index not in seen:
            seen.add(update.output.index)
            yield update.output
    for output in follower.outputs_in_order():
        if output.index not in seen:
            seen.add(output.index)
            yield output
