"""The device worker: one thread owns the device and runs one job at a time.

It takes the next job from the manager, pins the job's models in the residency manager,
runs the capability with a RunContext, and turns the outcome into the finished event.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from typing import Any

from google.protobuf.message import Message
from PIL import Image

from paletta.v1 import image_pb2, job_pb2
from paletta_server.capabilities.base import Capability
from paletta_server.config import Config
from paletta_server.errors import JobCancelled, PalettaError
from paletta_server.jobs import store as st
from paletta_server.jobs.manager import JobManager
from paletta_server.models.profiles import Profile
from paletta_server.models.residency import ResidencyManager
from paletta_server.models.styles import StyleRegistry
from paletta_server.storage import AssetInfo, AssetStore

log = logging.getLogger(__name__)
PREVIEW_EDGE = 256
# typed result message → its field in JobOutput's `result` oneof
RESULT_FIELDS = {f.message_type.full_name: f.name for f in job_pb2.JobOutput.DESCRIPTOR.oneofs_by_name["result"].fields}


class JobContext:
    """RunContext for one job (see capabilities/base.py)."""

    def __init__(self, worker: DeviceWorker, job_id: str):
        self._worker = worker
        self._manager = worker.manager
        self.job_id = job_id
        self.job_name = f"jobs/{job_id}"
        self.assets: AssetStore = worker.assets
        self.profile: Profile = worker.profile
        self.device = worker.residency.device
        self.config: Config = worker.config
        self.styles: StyleRegistry = worker.styles
        self._outputs = 0

    def model(self, key: str) -> Any:
        def listener(stage: str, model: str, done: int) -> None:
            self._manager.emit(self.job_id, "progress",
                               job_pb2.JobProgress(step=done, total_steps=1, stage=stage, model=model))

        return self._worker.residency.ensure_resident(key, listener)

    def use_models(self, keys: list[str]) -> None:
        self._worker.residency.pin(set(keys))

    def progress(self, step: int, total: int, stage: str) -> None:
        self._manager.emit(self.job_id, "progress", job_pb2.JobProgress(step=step, total_steps=total, stage=stage))

    def preview(self, image: Image.Image, step: int) -> None:
        image = image.convert("RGB")
        image.thumbnail((PREVIEW_EDGE, PREVIEW_EDGE))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=70)
        self._manager.emit(self.job_id, "preview", job_pb2.JobPreview(jpeg=buf.getvalue(), step=step))

    def check_cancelled(self) -> None:
        if self._manager.cancel_requested(self.job_id):
            raise JobCancelled(self.job_name)

    def open_image(self, asset_name: str) -> Image.Image:
        return self.assets.open_image(asset_name)

    def emit_output(self, image: Image.Image | None, *, parameters: dict, seed: int = 0,
                    result: Message | None = None) -> AssetInfo | None:
        output = job_pb2.JobOutput(index=self._outputs, seed=seed)
        parameters = {"capability": self._worker.current_capability, "job": self.job_name, **parameters}
        info = None
        if image is not None:
            info = self.assets.put_image(image, parameters)
            output.asset.CopyFrom(image_pb2.Asset(name=info.name, mime=info.mime, width=info.width,
                                                  height=info.height, size_bytes=info.size_bytes))
        output.parameters = json.dumps(parameters, sort_keys=True)
        if result is not None:
            getattr(output, RESULT_FIELDS[result.DESCRIPTOR.full_name]).CopyFrom(result)
        self._manager.add_output(self.job_id, output)
        self._outputs += 1
        return info


class DeviceWorker:
    def __init__(self, manager: JobManager, capabilities: dict[str, Capability], residency: ResidencyManager,
                 assets: AssetStore, config: Config, profile: Profile, styles: StyleRegistry):
        self.manager = manager
        self.capabilities = capabilities
        self.residency = residency
        self.assets = assets
        self.config = config
        self.profile = profile
        self.styles = styles
        self.current_capability = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="paletta-device", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.manager.wake_worker()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            job_id = self.manager.next_job(self._stop)
            if job_id is None:
                continue
            try:
                self.run_job(job_id)
            except Exception as exc:  # e.g. a job persisted by a build that had a capability this one lacks
                log.exception("could not run job %s", job_id)
                try:
                    self.manager.finish(job_id, st.FAILED, ("INTERNAL", "ENGINE_ERROR", f"{type(exc).__name__}: {exc}"))
                except Exception:  # the store itself failed: keep the worker alive for the next job
                    log.exception("could not record the failure of job %s", job_id)

    def run_job(self, job_id: str) -> None:
        row = self.manager.get_row(job_id)
        capability = self.capabilities[row.capability]
        self.current_capability = row.capability
        request = capability.request_type.FromString(row.request)
        self.manager.start(job_id)
        ctx = JobContext(self, job_id)
        self.residency.pin(set(capability.models(request, self.profile)))
        outcome: tuple[str, tuple[str, str, str] | None] = (st.SUCCEEDED, None)
        try:
            capability.run(request, ctx)
        except JobCancelled:
            outcome = (st.CANCELLED, ("CANCELLED", "CANCELLED", "cancelled while running"))
        except PalettaError as exc:
            outcome = (st.FAILED, (exc.code, exc.reason, exc.message))
        except Exception as exc:  # a failing job must never take the worker down
            if type(exc).__name__ == "OutOfMemoryError":
                outcome = (st.FAILED, ("RESOURCE_EXHAUSTED", "OUT_OF_MEMORY", str(exc)[:500]))
                self.residency.pin(set())
                self.residency.unload()  # start the next job from a clean device
            else:
                log.exception("job %s failed", job_id)
                outcome = (st.FAILED, ("INTERNAL", "ENGINE_ERROR", f"{type(exc).__name__}: {exc}"[:1000]))
        finally:
            # Unpin before the finished event, so a client reacting to it may unload at once.
            self.residency.pin(set())
            self.current_capability = ""
        self.manager.finish(job_id, *outcome)
