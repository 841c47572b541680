"""What the job manager and a device worker say to each other: plain messages, no shared objects.

The manager hands a worker an ``Assignment``; the worker answers with ``Started``, ``Progress``,
``Preview``, ``Output`` and finally ``Finished`` through ``WorkerLink.send``, and asks
``cancel_requested`` between steps. Today the worker is a thread and the link is the manager
itself (messages go through a queue to the manager's event thread, so the device never waits for
the database or for PNG encoding); a worker in another process or on another machine needs only
another ``WorkerLink``. Images travel as PIL images in-process; ``Output.asset`` carries an asset
the worker already stored (a pipeline stores the images it chains to its next step).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from google.rpc import status_pb2

if TYPE_CHECKING:
    from PIL import Image

    from paletta_server.storage import AssetInfo


@dataclass(frozen=True)
class Assignment:
    """Run this job: its capability and the serialized ``paletta.v1.JobSpec``."""

    job_id: str
    capability: str
    spec: bytes


@dataclass(frozen=True)
class Started:
    job_id: str


@dataclass(frozen=True)
class Progress:
    job_id: str
    step: int
    total: int
    stage: str
    model: str = ""


@dataclass(frozen=True)
class Preview:
    job_id: str
    jpeg: bytes
    step: int


@dataclass(frozen=True)
class Output:
    """One output: an image to store (or one already stored), its parameters and typed result."""

    job_id: str
    index: int
    parameters: dict[str, Any]
    seed: int = 0
    image: Image.Image | None = None
    asset: AssetInfo | None = None
    result: bytes = b""  # a serialized typed result message …
    result_type: str = ""  # … and its full proto name, e.g. "paletta.v1.Detections"


@dataclass(frozen=True)
class Finished:
    """The job ended: ``error`` unset means it succeeded; code CANCELLED means it was cancelled."""

    job_id: str
    error: status_pb2.Status | None = None
    seconds: float = field(default=0.0, compare=False)


Message = Started | Progress | Preview | Output | Finished


class WorkerLink(Protocol):
    """The manager as a device worker sees it."""

    def next_assignment(self, stop: threading.Event, resident: Callable[[str], bool],
                        timeout: float = 0.5) -> Assignment | None:
        """The next job to run (preferring jobs whose model is ``resident`` on this worker), or
        None after ``timeout`` or once ``stop`` is set."""

    def send(self, message: Message) -> None:
        """Report on an assigned job; returns at once, never blocks on storage."""

    def cancel_requested(self, job_id: str) -> bool:
        """Whether the job's cancellation was asked for (checked between steps)."""
