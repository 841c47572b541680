"""The synchronous client and its job handle."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.message import Message
from PIL import Image

from paletta import _common as c
from paletta._capabilities import Capabilities, ImageSlot
from paletta._stubs import make_stubs
from paletta.errors import PalettaError, from_rpc_error
from paletta.v1 import (
    asset_service_pb2,
    image_pb2,
    job_pb2,
    job_service_pb2,
    style_service_pb2,
    system_service_pb2,
)

_TERMINAL = {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}


class Backoff:
    """Exponential backoff between re-attach attempts, bounded by a total time since the first failure."""

    def __init__(self, timeout: float, first: float = 0.05, cap: float = 2.0) -> None:
        self.timeout = timeout
        self.first = first
        self.cap = cap
        self.reset()

    def reset(self) -> None:
        self.attempt = 0
        self.started: float | None = None

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None once the time is spent."""
        now = time.monotonic()
        if self.started is None:
            self.started = now
        if now - self.started >= self.timeout:
            return None
        delay = min(self.first * (2**self.attempt), self.cap)
        self.attempt += 1
        return delay


class JobHandle:
    """One job: iterate its events, wait for it, get its images; re-attaches after a dropped stream.

    Example::

        job = client.generate("a knight")
        for event in job:            # JobEvent messages: queued, started, progress, preview, output, finished
            if event.HasField("progress"):
                print(event.progress.step, "/", event.progress.total_steps)
        job.wait()                   # the final Job; raises JobFailed if it failed
        image = job.image()          # the first output as a PIL image
    """

    def __init__(
        self,
        client: Client,
        open_stream: Callable[[], Iterator[job_pb2.JobEvent]] | None = None,
        *,
        name: str = "",
        after_seq: int = 0,
    ) -> None:
        self._client = client
        self._open_stream = open_stream
        self._tracker = c.JobTracker(name=name, last_seq=after_seq)
        self._stream: Any = None
        self._buffer: deque[job_pb2.JobEvent] = deque()
        self._backoff = Backoff(client.reconnect_timeout)
        self.reattach_count = 0
        """How many times the handle re-attached after a dropped stream."""

    def _start(self) -> JobHandle:
        """Open the capability stream and read its first event, so request errors raise here."""
        assert self._open_stream is not None
        self._stream = self._open_stream()
        self._open_stream = None
        try:
            event = next(self._stream)
        except grpc.RpcError as err:
            self._stream = None
            raise from_rpc_error(err) from err
        except StopIteration:
            self._stream = None
            raise PalettaError("the server ended the job stream without any event") from None
        self._tracker.accept(event)
        self._buffer.append(event)
        return self

    @property
    def name(self) -> str:
        """The job's resource name, "jobs/{id}"."""
        return self._tracker.name

    @property
    def last_seq(self) -> int:
        """The seq of the last event seen; re-attaching replays from here."""
        return self._tracker.last_seq

    @property
    def done(self) -> bool:
        """Whether the finished event has been seen."""
        return self._tracker.done

    @property
    def job(self) -> job_pb2.Job | None:
        """The final Job once finished, else None."""
        return self._tracker.final

    def __repr__(self) -> str:
        state = c.state_label(self._tracker.final.state) if self._tracker.final else "open"
        return f"<JobHandle {self.name} {state} seq={self.last_seq}>"

    def _watch(self) -> Iterator[job_pb2.JobEvent]:
        request = job_service_pb2.WatchJobRequest(job=self.name, after_seq=self.last_seq)
        return self._client._stubs["JobService"].WatchJob(request, metadata=self._client._metadata)

    def _retry(self, error: PalettaError | grpc.RpcError) -> None:
        """Sleep before re-attaching, or raise ``error`` when it is not worth it."""
        code = error.code() if isinstance(error, grpc.RpcError) else error.code  # type: ignore[attr-defined]
        converted = from_rpc_error(error) if isinstance(error, grpc.RpcError) else error
        if not self.name or code not in c.REATTACH_CODES:
            raise converted
        delay = self._backoff.next_delay()
        if delay is None:
            raise converted
        time.sleep(delay)
        self.reattach_count += 1

    def _settle_ended_stream(self) -> None:
        """A stream ended without `finished`: ask for the job; if it is over, that is the end."""
        job = self._client.get_job(self.name)
        if job.state in _TERMINAL:
            self._tracker.final = job
            for output in job.outputs:
                self._tracker.outputs.setdefault(output.index, output)
        else:
            # Still running (the server may be shutting down): re-attach after a pause.
            self._retry(PalettaError("job stream ended early", code=grpc.StatusCode.UNAVAILABLE))

    def _next_event(self) -> job_pb2.JobEvent | None:
        while True:
            if self._buffer:
                return self._buffer.popleft()
            if self._tracker.done:
                return None
            try:
                if self._stream is None:
                    self._stream = self._watch()
                event = next(self._stream)
            except StopIteration:
                self._stream = None
                try:
                    self._settle_ended_stream()
                except PalettaError as err:
                    self._retry(err)
                continue
            except grpc.RpcError as err:
                self._stream = None
                self._retry(err)
                continue
            if self._tracker.accept(event):
                self._backoff.reset()
                return event

    def __iter__(self) -> Iterator[job_pb2.JobEvent]:
        """The job's events from where the handle is, up to and including `finished`."""
        while (event := self._next_event()) is not None:
            yield event

    def wait(self) -> job_pb2.Job:
        """Follow the job to its end and return the final Job.

        Raises :class:`~paletta.JobFailed` (or :class:`~paletta.JobCancelled`) unless it succeeded.

        Example::

            job = client.generate("a knight").wait()
            print(job.state, [o.asset.name for o in job.outputs])
        """
        for _ in self:
            pass
        return self._tracker.check()

    def outputs(self) -> Iterator[job_pb2.JobOutput]:
        """Each output as soon as it is stored, in order; raises JobFailed at the end if the job failed."""
        seen: set[int] = set()
        for output in self._tracker.sorted_outputs():
            seen.add(output.index)
            yield output
        for event in self:
            if event.HasField("output") and event.output.index not in seen:
                seen.add(event.output.index)
                yield event.output
        for output in self._tracker.sorted_outputs():
            if output.index not in seen:
                seen.add(output.index)
                yield output
        self._tracker.check()

    def images(self) -> Iterator[Image.Image]:
        """The output images as PIL images, downloaded through AssetService as they are stored.

        Example::

            for i, image in enumerate(client.generate("a knight", variants=3).images()):
                image.save(f"knight-{i}.png")
        """
        for output in self.outputs():
            if output.HasField("asset") and output.asset.name:
                yield self._client.download_image(output.asset.name)

    def image(self) -> Image.Image:
        """The first output image."""
        for image in self.images():
            return image
        raise PalettaError(f"job {self.name} has no image output", code=grpc.StatusCode.NOT_FOUND)

    def results(self) -> list[c.Result]:
        """The typed results (Detections, Caption, PromptExpansion, Segmentation) of all outputs.

        Example::

            caption = client.caption("photo.jpg").results()[0]
            print(caption.text)
        """
        self.wait()
        return [r for r in (c.output_result(o) for o in self._tracker.sorted_outputs()) if r is not None]

    def cancel(self) -> job_pb2.Job:
        """Ask the server to cancel the job; keep iterating to see it end CANCELLED."""
        return self._client.cancel_job(self.name)

    def close(self) -> None:
        """Stop following the job (the job itself goes on)."""
        if self._stream is not None and hasattr(self._stream, "cancel"):
            self._stream.cancel()
        self._stream = None

    def __enter__(self) -> JobHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client(Capabilities[JobHandle]):
    """Synchronous Paletta client.

    Every capability call (``generate``, ``edit``, ``upscale``, …) uploads its image arguments
    through AssetService, starts the job and returns a :class:`JobHandle`.

    Example::

        import paletta

        with paletta.Client("127.0.0.1:50051", token="s3cret") as client:
            client.generate("a knight", seed=1).image().save("knight.png")
    """

    def __init__(
        self,
        address: str = c.DEFAULT_ADDRESS,
        token: str | None = None,
        tls_root_cert: str | os.PathLike[str] | bytes | None = None,
        *,
        tls: bool = False,
        channel: grpc.Channel | None = None,
        reconnect_timeout: float = 30.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """Connect to ``address``; TLS when ``tls_root_cert`` is given (or ``tls=True`` for system roots).

        ``channel`` replaces the channel (tests); ``reconnect_timeout`` bounds re-attach attempts.
        """
        self.address = address
        self.reconnect_timeout = reconnect_timeout
        self._metadata = c.auth_metadata(token)
        self._uploaded: dict[str, image_pb2.Asset] = {}
        if channel is None:
            opts = [*c.CHANNEL_OPTIONS, *options]
            root = c.read_root_cert(tls_root_cert)
            if root is not None or tls:
                creds = grpc.ssl_channel_credentials(root_certificates=root)
                channel = grpc.secure_channel(address, creds, options=opts)
            else:
                channel = grpc.insecure_channel(address, options=opts)
            self._owns_channel = True
        else:
            self._owns_channel = False
        self.channel = channel
        self._stubs = make_stubs(channel)

    # -- plumbing ---------------------------------------------------------------------------

    def _unary(self, service: str, method: str, request: Message, **kwargs: Any) -> Any:
        try:
            return getattr(self._stubs[service], method)(request, metadata=self._metadata, **kwargs)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def _image_ref(self, value: c.ImageInput) -> image_pb2.ImageRef:
        prepared = c.prepare_image(value)
        if prepared.asset is not None:
            return image_pb2.ImageRef(asset=prepared.asset)
        return image_pb2.ImageRef(asset=self._upload_prepared(prepared).name)

    def _upload_prepared(self, prepared: c.PreparedImage) -> image_pb2.Asset:
        assert prepared.data is not None
        digest = prepared.digest
        if digest not in self._uploaded:
            try:
                asset = self._stubs["AssetService"].UploadAsset(
                    c.upload_requests(prepared.data), metadata=self._metadata
                )
            except grpc.RpcError as err:
                raise from_rpc_error(err) from err
            self._uploaded[digest] = asset
        return self._uploaded[digest]

    def _start(self, service: str, method: str, request: Message, images: list[ImageSlot]) -> JobHandle:
        for slot in images:
            getattr(slot.parent, slot.field).CopyFrom(self._image_ref(slot.value))
        call = getattr(self._stubs[service], method)
        return JobHandle(self, lambda: call(request, metadata=self._metadata))._start()

    def close(self) -> None:
        """Close the channel (if the client made it)."""
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- jobs -------------------------------------------------------------------------------

    def attach(self, job: str | job_pb2.Job, after_seq: int = 0) -> JobHandle:
        """A handle on an existing job, replaying its events after ``after_seq``.

        Example::

            job = client.attach("jobs/42", after_seq=handle.last_seq)
            job.wait()
        """
        return JobHandle(self, name=c.job_name(job), after_seq=after_seq)

    def watch_job(self, job: str | job_pb2.Job, after_seq: int = 0) -> JobHandle:
        """Same as :meth:`attach`: iterate the returned handle for the job's events."""
        return self.attach(job, after_seq)

    def get_job(self, name: str | job_pb2.Job) -> job_pb2.Job:
        """One job by name.

        Example::

            print(client.get_job("jobs/42").state)
        """
        return self._unary("JobService", "GetJob", job_service_pb2.GetJobRequest(name=c.job_name(name)))

    def iter_jobs(
        self, states: Iterable[int | str] = (), capability: str = "", page_size: int = 0
    ) -> Iterator[job_pb2.Job]:
        """All jobs, newest first, fetching pages as needed."""
        token = ""
        while True:
            page = self._unary(
                "JobService",
                "ListJobs",
                job_service_pb2.ListJobsRequest(
                    page_size=page_size,
                    page_token=token,
                    states=[c.job_state(s) for s in states],
                    capability=capability,
                ),
            )
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def list_jobs(
        self, states: Iterable[int | str] = (), capability: str = "", limit: int | None = 50
    ) -> list[job_pb2.Job]:
        """Jobs newest first, filtered by state ("queued", "running", …) and capability.

        Example::

            for job in client.list_jobs(states=["running", "queued"]):
                print(job.name, job.capability)
        """
        request = job_service_pb2.ListJobsRequest(states=[c.job_state(s) for s in states], capability=capability)
        return self._collect_pages("ListJobs", request, "jobs", limit)

    def cancel_job(self, name: str | job_pb2.Job) -> job_pb2.Job:
        """Cancel a queued job at once or a running one at its next step.

        Example::

            client.cancel_job("jobs/42")
        """
        return self._unary("JobService", "CancelJob", job_service_pb2.CancelJobRequest(name=c.job_name(name)))

    def approve_output(self, job: str | job_pb2.Job | JobHandle, index: int = 0, approved: bool = True) -> job_pb2.Job:
        """Mark (or unmark) one output of a finished job as chosen.

        Example::

            client.approve_output("jobs/42", index=1)
        """
        request = job_service_pb2.ApproveOutputRequest(job=c.job_name(job), index=index, approved=approved)
        return self._unary("JobService", "ApproveOutput", request)

    def list_approved(self, limit: int | None = 50) -> list[job_service_pb2.ApprovedOutput]:
        """Approved outputs, newest job first.

        Example::

            for item in client.list_approved():
                print(item.job, item.output.asset.name)
        """
        request = job_service_pb2.ListApprovedOutputsRequest()
        return self._collect_pages("ListApprovedOutputs", request, "outputs", limit)

    def _collect_pages(self, method: str, request: Any, field: str, limit: int | None) -> list[Any]:
        """The ``field`` items of a paged JobService list call, up to ``limit`` (None: all)."""
        out: list[Any] = []
        request.page_size = min(limit or 0, 1000)
        while True:
            page = self._unary("JobService", method, request)
            for item in getattr(page, field):
                out.append(item)
                if limit is not None and len(out) >= limit:
                    return out
            if not page.next_page_token:
                return out
            request.page_token = page.next_page_token

    # -- assets -----------------------------------------------------------------------------

    def upload(self, source: c.ImageInput) -> image_pb2.Asset:
        """Store an image (path, bytes or PIL image) in chunks of 256 KiB; returns its Asset.

        Example::

            asset = client.upload("photo.jpg")
            print(asset.name, asset.width, asset.height)
        """
        prepared = c.prepare_image(source)
        if prepared.asset is not None:
            return self.get_asset(prepared.asset)
        return self._upload_prepared(prepared)

    def download(self, asset: str | image_pb2.Asset) -> bytes:
        """The bytes of an asset.

        Example::

            open("out.png", "wb").write(client.download("assets/3f…"))
        """
        request = asset_service_pb2.DownloadAssetRequest(name=c.asset_name(asset))
        try:
            stream = self._stubs["AssetService"].DownloadAsset(request, metadata=self._metadata)
            return b"".join(chunk.data for chunk in stream)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def download_image(self, asset: str | image_pb2.Asset) -> Image.Image:
        """An asset decoded as a PIL image."""
        return c.decode_image(self.download(asset))

    def get_asset(self, name: str | image_pb2.Asset) -> image_pb2.Asset:
        """An asset's metadata (mime, size, dimensions)."""
        return self._unary("AssetService", "GetAsset", asset_service_pb2.GetAssetRequest(name=c.asset_name(name)))

    # -- system and styles ------------------------------------------------------------------

    def status(self) -> system_service_pb2.GetStatusResponse:
        """A snapshot of the server: device, profile, memory, loaded models, queue.

        Example::

            s = client.status()
            print(s.device, s.profile, s.memory_used_bytes, s.queue_length)
        """
        return self._unary("SystemService", "GetStatus", system_service_pb2.GetStatusRequest())

    def watch_status(self, interval_ms: int = 1000) -> Iterator[system_service_pb2.GetStatusResponse]:
        """Status snapshots every ``interval_ms`` until the caller stops iterating."""
        request = system_service_pb2.WatchStatusRequest(interval_ms=interval_ms)
        stream = self._stubs["SystemService"].WatchStatus(request, metadata=self._metadata)
        try:
            yield from stream
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            stream.cancel()

    def list_models(self) -> list[system_service_pb2.ModelInfo]:
        """Every model the registry knows for the active profile."""
        return list(self._unary("SystemService", "ListModels", system_service_pb2.ListModelsRequest()).models)

    def unload_models(self, keys: Iterable[str] = ()) -> system_service_pb2.UnloadModelsResponse:
        """Free resident models: those named, or all of them.

        Example::

            freed = client.unload_models().freed_bytes
        """
        request = system_service_pb2.UnloadModelsRequest(keys=list(keys))
        return self._unary("SystemService", "UnloadModels", request)

    def list_styles(self) -> list[style_service_pb2.Style]:
        """The style LoRAs requests can stack.

        Example::

            print([s.name for s in client.list_styles()])
        """
        return list(self._unary("StyleService", "ListStyles", style_service_pb2.ListStylesRequest()).styles)
