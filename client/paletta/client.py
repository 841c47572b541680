"""The synchronous client and its job handle: a thin blocking transport around the shared core."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Generic, Never, TypeVar, cast

import grpc
from PIL import Image

from paletta import _calls
from paletta import _common as c
from paletta._calls import JobCall, Pager, Rpc
from paletta._capabilities import Capabilities
from paletta._follow import FetchJob, Finished, JobFollower, Raise, Read, Submit, Update, Watch, new_outputs
from paletta._handle import HandleBase, image_asset
from paletta._stubs import make_stubs
from paletta.errors import PalettaError, from_rpc_error
from paletta.results import Caption, Detections, FaceIdentity, Progress, PromptExpansion, Result, Segmentation
from paletta.v1 import (
    asset_service_pb2,
    image_pb2,
    job_pb2,
    job_service_pb2,
    style_service_pb2,
    system_service_pb2,
)

R = TypeVar("R")
T = TypeVar("T")

ProgressCallback = Callable[[Progress], object]
"""Called with each :class:`~paletta.Progress` while a handle follows its job."""


class JobHandle(HandleBase[R], Generic[R]):
    """One job: iterate its events or progress, wait for it, get its images or typed results.

    Re-attaches with ``WatchJob(after_seq=last seen seq)`` after a dropped stream.

    Example::

        job = client.generate("a knight", variants=2)
        for p in job.progress():              # typed Progress: stage, step, total, variant, preview
            print(p.stage, p.step, "/", p.total)
        job.image().save("knight.png")        # the first output, downloaded
        job.wait().outputs[1].seed            # the final Job; raises JobFailed if it failed
    """

    def __init__(
        self, client: Client, call: JobCall[R] | None = None, *, name: str = "", after_seq: int = 0
    ) -> None:
        self._client = client
        self._core = JobFollower(name, after_seq, call, client.reconnect_timeout)
        self._stream: Any = None

    # -- the transport: do what the follower asks ------------------------------------------------

    def _step(self) -> bool:
        """Carry out the follower's next action; False once the job is over."""
        core = self._core
        match core.next_action():
            case Submit(call):
                try:
                    self._stream = self._client._open_job(call)
                except PalettaError as err:
                    core.on_error(err)
                else:
                    core.opened()
            case Read():
                try:
                    event = next(self._stream)
                except StopIteration:
                    self._stream = None
                    core.on_end()
                except grpc.RpcError as err:
                    self._stream = None
                    core.on_error(from_rpc_error(err))
                else:
                    core.on_event(event)
            case Watch(request, delay):
                time.sleep(delay)
                self._stream = self._client._stubs["JobService"].WatchJob(request, metadata=self._client._metadata)
                core.opened()
            case FetchJob(request):
                try:
                    core.on_job(self._client.get_job(request.name))
                except PalettaError as err:
                    core.on_error(err)
            case Finished():
                return False
            case Raise(error):
                raise error
        return True

    def _updates(self) -> Iterator[Update]:
        while True:
            if self._core.pending:
                yield self._core.pending.popleft()
            elif not self._step():
                return

    def start(self) -> JobHandle[R]:
        """Submit the job (if not yet) and read its first event, so that a rejected request raises here.

        Capability calls return handles already started; this returns at once then.
        """
        while not self._core.pending and self._step():
            pass
        return self

    def _followed(self, on_progress: ProgressCallback | None) -> Iterator[Update]:
        for update in self._updates():
            if on_progress is not None and update.progress is not None:
                on_progress(update.progress)
            yield update

    # -- the public surface --------------------------------------------------------------------

    def __iter__(self) -> Iterator[job_pb2.JobEvent]:
        """The job's events (JobEvent messages) from where the handle is, up to and including finished."""
        for update in self._updates():
            yield update.event

    def progress(self) -> Iterator[Progress]:
        """Typed progress (queued, stages, previews) until the job ends; then :meth:`wait` returns at once.

        Example::

            for p in job.progress():
                print(f"{p.stage} {p.step}/{p.total} variant {p.variant}")
        """
        for update in self._updates():
            if update.progress is not None:
                yield update.progress

    def wait(self, on_progress: ProgressCallback | None = None) -> job_pb2.Job:
        """Follow the job to its end and return the final Job.

        Raises :class:`~paletta.JobFailed` (or :class:`~paletta.JobCancelled`) unless it
        succeeded; the error carries the job's ``reason`` and ``field_violations``.

        Example::

            job = client.generate("a knight").wait(on_progress=print)
            print([o.asset.name for o in job.outputs])
        """
        for _ in self._followed(on_progress):
            pass
        return self._core.check()

    def outputs(self, on_progress: ProgressCallback | None = None) -> Iterator[job_pb2.JobOutput]:
        """Each output as soon as it is stored, in order; raises JobFailed at the end if the job failed."""
        yield from new_outputs(self._core, self._followed(on_progress))
        self._core.check()

    def images(self, on_progress: ProgressCallback | None = None) -> Iterator[Image.Image]:
        """The output images as PIL images, downloaded as they are stored.

        Example::

            for i, image in enumerate(client.generate("a knight", variants=3).images()):
                image.save(f"knight-{i}.png")
        """
        for output in self.outputs(on_progress):
            if (asset := image_asset(output)) is not None:
                yield self._client.download_image(asset)

    def image(self, on_progress: ProgressCallback | None = None) -> Image.Image:
        """The first output image (the job may still be making more).

        Example::

            client.edit("street.jpg", "make it night").image().save("night.png")
        """
        for image in self.images(on_progress):
            return image
        raise self._no_image()

    def results(self, on_progress: ProgressCallback | None = None) -> list[R]:
        """The typed results of all outputs, once the job has finished.

        Example::

            for detections in client.detect("street.jpg").results():
                print(detections.labels)
        """
        self.wait(on_progress)
        return self._typed_results()

    def result(self, on_progress: ProgressCallback | None = None) -> R:
        """The first typed result (Detections, Caption, PromptExpansion or Segmentation).

        Example::

            print(client.caption("photo.jpg").result().text)
        """
        self.wait(on_progress)
        return self._first_result()

    def cancel(self) -> job_pb2.Job:
        """Ask the server to cancel the job; keep following to see it end CANCELLED."""
        return self._client.cancel_job(self.name)

    def close(self) -> None:
        """Stop following the job (the job itself goes on)."""
        if self._stream is not None and hasattr(self._stream, "cancel"):
            self._stream.cancel()
        self._stream = None

    def __enter__(self) -> JobHandle[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client(
    Capabilities[
        JobHandle[Never],
        JobHandle[Segmentation],
        JobHandle[Detections],
        JobHandle[Caption],
        JobHandle[PromptExpansion],
        JobHandle[Result],
        JobHandle[FaceIdentity],
    ]
):
    """Synchronous Paletta client.

    Every capability call (``generate``, ``edit``, ``detect``, …) uploads its image arguments
    through AssetService, starts the job and returns a :class:`JobHandle` (a rejected request
    raises :class:`~paletta.InvalidArgument` at once).

    Example::

        import paletta

        with paletta.Client("127.0.0.1:50051", token="s3cret") as client:
            client.generate("a knight", seed=1).image().save("knight.png")
            print(client.caption("knight.png").result().text)
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
        self._owns_channel = channel is None
        if channel is None:
            opts = [*c.CHANNEL_OPTIONS, *options]
            root = c.read_root_cert(tls_root_cert)
            if root is not None or tls:
                channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root), options=opts)
            else:
                channel = grpc.insecure_channel(address, options=opts)
        self.channel = channel
        self._stubs = make_stubs(channel)

    # -- transport --------------------------------------------------------------------------

    def _unary(self, rpc: Rpc[T]) -> T:
        try:
            response = getattr(self._stubs[rpc.service], rpc.method)(rpc.request, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return rpc.unwrap(response)

    def _pages(self, pager: Pager[T]) -> Iterator[T]:
        while not pager.done:
            yield from pager.feed(self._unary(pager.rpc))

    def _image_ref(self, value: c.ImageInput) -> image_pb2.ImageRef:
        prepared = c.prepare_image(value)
        if prepared.asset is not None:
            return image_pb2.ImageRef(asset=prepared.asset)
        return image_pb2.ImageRef(asset=self._upload_prepared(prepared).name)

    def _upload_prepared(self, prepared: c.PreparedImage) -> image_pb2.Asset:
        assert prepared.data is not None
        if prepared.digest not in self._uploaded:
            try:
                asset = self._stubs["AssetService"].UploadAsset(
                    c.upload_requests(prepared.data), metadata=self._metadata
                )
            except grpc.RpcError as err:
                raise from_rpc_error(err) from err
            self._uploaded[prepared.digest] = asset
        return self._uploaded[prepared.digest]

    def _open_job(self, call: JobCall[Any]) -> Iterator[job_pb2.JobEvent]:
        """Run the call's dependencies, upload its images, open its capability stream."""
        for dependency in call.dependencies:
            dependency.fill(JobHandle(self, dependency.call).start().wait())
        for slot in call.images:
            slot.fill(self._image_ref(slot.value))
        method = getattr(self._stubs[call.service], call.method)
        return cast(Iterator[job_pb2.JobEvent], method(call.request, metadata=self._metadata))

    def _submit(self, call: JobCall[Any]) -> JobHandle[Any]:
        return JobHandle(self, call).start()

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

    def attach(self, job: c.JobRef, after_seq: int = 0) -> JobHandle[Result]:
        """A handle on an existing job, replaying its events after ``after_seq``.

        Example::

            job = client.attach("jobs/42", after_seq=handle.last_seq)
            job.wait()
        """
        return JobHandle(self, name=c.job_name(job), after_seq=after_seq)

    def watch_job(self, job: c.JobRef, after_seq: int = 0) -> JobHandle[Result]:
        """Same as :meth:`attach`: iterate the returned handle for the job's events.

        Example::

            for event in client.watch_job("jobs/42"):
                print(event.seq, event.WhichOneof("kind"))
        """
        return self.attach(job, after_seq)

    def get_job(self, name: c.JobRef) -> job_pb2.Job:
        """One job by name.

        Example::

            print(client.get_job("jobs/42").state)
        """
        return self._unary(_calls.get_job(name))

    def iter_jobs(
        self, states: Iterable[int | str] = (), capability: str = "", limit: int | None = None
    ) -> Iterator[job_pb2.Job]:
        """Jobs newest first, fetching pages as the caller iterates (``limit`` None: all of them).

        Example::

            for job in client.iter_jobs(states=["failed"]):
                print(job.name, job.error.message)
        """
        return self._pages(_calls.list_jobs(states, capability, limit))

    def list_jobs(
        self, states: Iterable[int | str] = (), capability: str = "", limit: int | None = 50
    ) -> list[job_pb2.Job]:
        """Jobs newest first, filtered by state ("queued", "running", …) and capability.

        Example::

            for job in client.list_jobs(states=["running", "queued"]):
                print(job.name, job.capability)
        """
        return list(self.iter_jobs(states, capability, limit))

    def cancel_job(self, name: c.JobRef) -> job_pb2.Job:
        """Cancel a queued job at once or a running one at its next step.

        Example::

            client.cancel_job("jobs/42")
        """
        return self._unary(_calls.cancel_job(name))

    def approve_output(self, job: c.JobRef, index: int = 0, approved: bool = True) -> job_pb2.Job:
        """Mark (or unmark) one output of a finished job as chosen.

        Example::

            client.approve_output("jobs/42", index=1)
        """
        return self._unary(_calls.approve_output(job, index, approved))

    def list_approved(self, limit: int | None = 50) -> list[job_service_pb2.ApprovedOutput]:
        """Approved outputs, newest job first.

        Example::

            for item in client.list_approved():
                print(item.job, item.output.asset.name)
        """
        return list(self._pages(_calls.list_approved(limit)))

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
        """An asset decoded as a PIL image.

        Example::

            mask = client.download_image(client.segment("a.png", "the sky").result().mask)
        """
        return c.decode_image(self.download(asset))

    def get_asset(self, name: str | image_pb2.Asset) -> image_pb2.Asset:
        """An asset's metadata (mime, size, dimensions).

        Example::

            print(client.get_asset("assets/3f…").width)
        """
        return self._unary(_calls.get_asset(name))

    # -- system and styles ------------------------------------------------------------------

    def status(self) -> system_service_pb2.GetStatusResponse:
        """A snapshot of the server: device, profile, memory, loaded models, queue.

        Example::

            s = client.status()
            print(s.device, s.profile, s.memory_used_bytes, s.queue_length)
        """
        return self._unary(_calls.get_status())

    def watch_status(self, interval_ms: int = 1000) -> Iterator[system_service_pb2.GetStatusResponse]:
        """Status snapshots every ``interval_ms`` until the caller stops iterating.

        Example::

            for s in client.watch_status(500):
                print(s.queue_length)
        """
        request = system_service_pb2.WatchStatusRequest(interval_ms=interval_ms)
        stream = self._stubs["SystemService"].WatchStatus(request, metadata=self._metadata)
        try:
            yield from stream
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            stream.cancel()

    def list_models(self) -> list[system_service_pb2.ModelInfo]:
        """Every model the registry knows for the active profile.

        Example::

            print([m.key for m in client.list_models() if m.resident])
        """
        return self._unary(_calls.list_models())

    def unload_models(self, keys: Iterable[str] = ()) -> system_service_pb2.UnloadModelsResponse:
        """Free resident models: those named, or all of them.

        Example::

            freed = client.unload_models().freed_bytes
        """
        return self._unary(_calls.unload_models(keys))

    def list_styles(self) -> list[style_service_pb2.Style]:
        """The style LoRAs requests can stack.

        Example::

            print([s.name for s in client.list_styles()])
        """
        return self._unary(_calls.list_styles())
