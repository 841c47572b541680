"""The device worker: one thread owns the device and runs one job at a time.

It asks its link (the job manager) for the next assignment, pins the job's models in the
residency manager, runs the capability with a RunContext, and reports everything back as plain
messages (jobs/messages.py): it never touches the job store, and never waits for outputs to be
encoded and stored.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from typing import Any

from google.protobuf.message import Message
from PIL import Image

from paletta.v1 import job_spec_pb2
from paletta_server.capabilities.base import Capability, OutputHandle
from paletta_server.config import Config
from paletta_server.engines.common import free_device_memory
from paletta_server.errors import EngineError, Interrupted, JobCancelled, PalettaError, ResourceExhausted, to_status
from paletta_server.jobs import messages as msg
from paletta_server.models.profiles import Profile
from paletta_server.models.residency import ResidencyManager
from paletta_server.models.styles import StyleRegistry
from paletta_server.storage import AssetStore

log = logging.getLogger(__name__)
PREVIEW_EDGE = 256


def preview_jpeg(image: Image.Image) -> bytes:
    """A preview as it is sent: RGB, at most PREVIEW_EDGE on its longer side, JPEG."""
    image = image.convert("RGB")
    image.thumbnail((PREVIEW_EDGE, PREVIEW_EDGE))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=70)
    return buf.getvalue()


class JobContext:
    """RunContext for one job (see capabilities/base.py)."""

    def __init__(self, worker: DeviceWorker, job_id: str, capability: str):
        self._worker = worker
        self._link = worker.link
        self.job_id = job_id
        self.job_name = f"jobs/{job_id}"
        self.capability = capability
        self.assets: AssetStore = worker.assets
        self.profile: Profile = worker.profile
        self.device = worker.residency.device
        self.config: Config = worker.config
        self.styles: StyleRegistry = worker.styles
        self._outputs = 0

    def model(self, key: str) -> Any:
        def listener(stage: str, model: str, done: int) -> None:
            self._link.send(msg.Progress(self.job_id, done, 1, stage, model))

        return self._worker.residency.ensure_resident(key, listener)

    def use_models(self, keys: list[str]) -> None:
        self._worker.residency.pin(set(keys))

    def progress(self, step: int, total: int, stage: str) -> None:
        self._link.send(msg.Progress(self.job_id, step, total, stage))

    def preview(self, image: Image.Image, step: int) -> None:
        self._link.send(msg.Preview(self.job_id, preview_jpeg(image), step))

    def check_cancelled(self) -> None:
        if self._link.cancel_requested(self.job_id):
            raise JobCancelled("cancelled while running")
        if self._worker.stopping:  # the server shuts down: end the job at this step, recorded as such
            raise Interrupted("the server stopped (shut down) while this job was running")

    def open_image(self, asset_name: str) -> Image.Image:
        return self.assets.open_image(asset_name)

    def emit_output(self, image: Image.Image | None, *, parameters: dict, seed: int = 0,
                    result: Message | None = None, store_now: bool = False) -> OutputHandle:
        parameters = {"capability": self.capability, "job": self.job_name, **parameters}
        asset = None
        if image is not None and store_now:  # the caller needs the asset name (a pipeline chains it)
            asset = self.assets.put_image(image, parameters)
            image = None
        self._link.send(msg.Output(
            self.job_id, self._outputs, parameters, seed, image=image, asset=asset,
            result=result.SerializeToString() if result is not None else b"",
            result_type=result.DESCRIPTOR.full_name if result is not None else "",
        ))
        self._outputs += 1
        return OutputHandle(asset)


class DeviceWorker:
    def __init__(self, link: msg.WorkerLink, capabilities: dict[str, Capability], residency: ResidencyManager,
                 assets: AssetStore, config: Config, profile: Profile, styles: StyleRegistry):
        self.link = link
        self.capabilities = capabilities
        self.residency = residency
        self.assets = assets
        self.config = config
        self.profile = profile
        self.styles = styles
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="paletta-device", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking jobs; a running job ends FAILED / INTERRUPTED at its next step (if it does not
        reach one within ``timeout``, the next start records it so)."""
        self._stop.set()
        self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            assignment = self.link.next_assignment(self._stop, self.residency.is_resident)
            if assignment is not None:
                self.run(assignment)

    def run(self, assignment: msg.Assignment) -> None:
        """Run one job to its Finished message; never raises."""
        job_id = assignment.job_id
        self.link.send(msg.Started(job_id))
        began = time.monotonic()
        error: PalettaError | None = None
        out_of_memory = False
        try:
            capability = self.capabilities.get(assignment.capability)
            if capability is None:  # a job persisted by a build that had a capability this one lacks
                raise EngineError(f"this server has no capability {assignment.capability!r}")
            request = capability.request_of(job_spec_pb2.JobSpec.FromString(assignment.spec))
            self.residency.pin(set(capability.models(request, self.profile)))
            capability.run(request, JobContext(self, job_id, assignment.capability))
        except PalettaError as exc:  # JobCancelled included
            error = exc
        except Exception as exc:  # a failing job must never take the worker down
            if type(exc).__name__ == "OutOfMemoryError":
                error = ResourceExhausted(str(exc)[:500], reason="OUT_OF_MEMORY")
                out_of_memory = True
            else:
                log.exception("job %s failed", job_id)
                error = EngineError(f"{type(exc).__name__}: {exc}"[:1000])
        finally:
            # Unpin before the finished event, so a client reacting to it may unload at once.
            self.residency.pin(set())
        if out_of_memory:
            # Start the next job from a clean device. Only now: while the exception was being handled
            # its traceback held the job's frames and with them its activations.
            self.residency.unload()
            free_device_memory()
        self.link.send(msg.Finished(job_id, to_status(error) if error is not None else None,
                                    seconds=time.monotonic() - began))
