"""The asyncio client (``grpc.aio``) and its job handle: a thin async transport around the shared core."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Sequence
from typing import Any, Generic, Never, TypeVar

import grpc
import grpc.aio
from PIL import Image

from paletta import _calls
from paletta import _common as c
from paletta._calls import JobCall, Pager, Rpc
from paletta._capabilities import Capabilities
from paletta._follow import FetchJob, Finished, JobFollower, Raise, Read, Submit, Update, Watch
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

AsyncProgressCallback = Callable[[Progress], object | Awaitable[object]]
"""Called with each :class:`~paletta.Progress`; may be a coroutine function."""


class AsyncJobHandle(HandleBase[R], Generic[R]):
    """One job, for asyncio code. The capability call returns it before anything is sent: the job
    is submitted on first use, so ``await client.edit(img, "make it night").image()`` is one expression.

    ``await handle`` submits (raising a rejected request's error) and returns the handle;
    ``async for`` gives its events, :meth:`progress` typed progress. Re-attaches with
    ``WatchJob(after_seq=last seen seq)`` after a dropped stream.

    Example::

        job = client.generate("a knight", variants=2)
        async for p in job.progress():
            print(p.stage, p.step, p.total)
        (await job.image()).save("knight.png")
    """

    def __init__(
        self, client: AsyncClient, call: JobCall[R] | None = None, *, name: str = "", after_seq: int = 0
    ) -> None:
        self._client = client
        self._core = JobFollower(name, after_seq, call, client.reconnect_timeout)
        self._stream: Any = None

    # -- the transport: do what the follower asks ------------------------------------------------

    async def _step(self) -> bool:
        """Carry out the follower's next action; False once the job is over."""
        core = self._core
        match core.next_action():
            case Submit(call):
                try:
                    self._stream = await self._client._open_job(call)
                except PalettaError as err:
                    core.on_error(err)
                else:
                    core.opened()
            case Read():
                try:
                    event = await self._stream.read()
                except grpc.RpcError as err:
                    self._stream = None
                    core.on_error(from_rpc_error(err))
                else:
                    if event is grpc.aio.EOF:  # type: ignore[attr-defined]  # missing from the stubs
                        self._stream = None
                        core.on_end()
                    else:
                        core.on_event(event)
            case Watch(request, delay):
                await asyncio.sleep(delay)
                self._stream = self._client._stubs["JobService"].WatchJob(request, metadata=self._client._metadata)
                core.opened()
            case FetchJob(request):
                try:
                    core.on_job(await self._client.get_job(request.name))
                except PalettaError as err:
                    core.on_error(err)
            case Finished():
                return False
            case Raise(error):
                raise error
        return True

    async def _updates(self) -> AsyncIterator[Update]:
        while True:
            if self._core.pending:
                yield self._core.pending.popleft()
            elif not await self._step():
                return

    async def start(self) -> AsyncJobHandle[R]:
        """Submit the job (if not yet) and read its first event; a rejected request raises here.

        ``await handle`` does the same.
        """
        while not self._core.pending and await self._step():
            pass
        return self

    def __await__(self) -> Generator[Any, None, AsyncJobHandle[R]]:
        return self.start().__await__()

    async def _followed(self, on_progress: AsyncProgressCallback | None) -> AsyncIterator[Update]:
        async for update in self._updates():
            if on_progress is not None and update.progress is not None:
                returned = on_progress(update.progress)
                if inspect.isawaitable(returned):
                    await returned
            yield update

    # -- the public surface --------------------------------------------------------------------

    async def __aiter__(self) -> AsyncIterator[job_pb2.JobEvent]:
        """The job's events (JobEvent messages) from where the handle is, up to and including finished."""
        async for update in self._updates():
            yield update.event

    async def progress(self) -> AsyncIterator[Progress]:
        """Typed progress (queued, stages, previews) until the job ends.

        Example::

            async for p in job.progress():
                bar.value = p.fraction
        """
        async for update in self._updates():
            if update.progress is not None:
                yield update.progress

    async def wait(self, on_progress: AsyncProgressCallback | None = None) -> job_pb2.Job:
        """Follow the job to its end and return the final Job; raises JobFailed unless it succeeded.

        Example::

            job = await client.generate("a knight").wait()
        """
        async for _ in self._followed(on_progress):
            pass
        return self._core.check()

    async def outputs(self, on_progress: AsyncProgressCallback | None = None) -> AsyncIterator[job_pb2.JobOutput]:
        """Each output as soon as it is stored, in order; raises JobFailed at the end if the job failed."""
        seen: set[int] = set()
        for output in self._core.outputs_in_order():
            seen.add(output.index)
            yield output
        async for update in self._followed(on_progress):
            if update.output is not None and update.output.index not in seen:
                seen.add(update.output.index)
                yield update.output
        for output in self._core.outputs_in_order():
            if output.index not in seen:
                seen.add(output.index)
                yield output
        self._core.check()

    async def images(self, on_progress: AsyncProgressCallback | None = None) -> AsyncIterator[Image.Image]:
        """The output images as PIL images, downloaded as they are stored.

        Example::

            async for image in client.generate("a knight", variants=2).images():
                image.show()
        """
        async for output in self.outputs(on_progress):
            if (asset := image_asset(output)) is not None:
                yield await self._client.download_image(asset)

    async def image(self, on_progress: AsyncProgressCallback | None = None) -> Image.Image:
        """The first output image.

        Example::

            night = await client.edit("street.jpg", "make it night").image()
        """
        async for image in self.images(on_progress):
            return image
        raise self._no_image()

    async def results(self, on_progress: AsyncProgressCallback | None = None) -> list[R]:
        """The typed results of all outputs, once the job has finished."""
        await self.wait(on_progress)
        return self._typed_results()

    async def result(self, on_progress: AsyncProgressCallback | None = None) -> R:
        """The first typed result.

        Example::

            print((await client.caption("photo.jpg").result()).text)
        """
        await self.wait(on_progress)
        return self._first_result()

    async def cancel(self) -> job_pb2.Job:
        """Ask the server to cancel the job (submitting it first if it was not yet)."""
        await self.start()
        return await self._client.cancel_job(self.name)

    def close(self) -> None:
        """Stop following the job (the job itself goes on)."""
        if self._stream is not None:
            self._stream.cancel()
        self._stream = None

    async def __aenter__(self) -> AsyncJobHandle[R]:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(
    Capabilities[
        AsyncJobHandle[Never],
        AsyncJobHandle[Segmentation],
        AsyncJobHandle[Detections],
        AsyncJobHandle[Caption],
        AsyncJobHandle[PromptExpansion],
        AsyncJobHandle[Result],
        AsyncJobHandle[FaceIdentity],
    ]
):
    """asyncio Paletta client on ``grpc.aio``: the same calls as :class:`~paletta.Client`.

    Capability calls return an :class:`AsyncJobHandle` at once (no await); the others are coroutines.

    Example::

        async with paletta.AsyncClient("127.0.0.1:50051") as client:
            (await client.generate("a knight", seed=1).image()).save("knight.png")
            print((await client.caption("knight.png").result()).text)
    """

    def __init__(
        self,
        address: str = c.DEFAULT_ADDRESS,
        token: str | None = None,
        tls_root_cert: str | os.PathLike[str] | bytes | None = None,
        *,
        tls: bool = False,
        channel: grpc.aio.Channel | None = None,
        reconnect_timeout: float = 30.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """Connect to ``address``; TLS when ``tls_root_cert`` is given (or ``tls=True`` for system roots)."""
        self.address = address
        self.reconnect_timeout = reconnect_timeout
        self._metadata = c.auth_metadata(token)
        self._uploaded: dict[str, image_pb2.Asset] = {}
        self._owns_channel = channel is None
        if channel is None:
            opts = [*c.CHANNEL_OPTIONS, *options]
            root = c.read_root_cert(tls_root_cert)
            if root is not None or tls:
                channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root), options=opts)
            else:
                channel = grpc.aio.insecure_channel(address, options=opts)
        self.channel = channel
        self._stubs = make_stubs(channel)

    # -- transport --------------------------------------------------------------------------

    async def _unary(self, rpc: Rpc[T]) -> T:
        try:
            response = await getattr(self._stubs[rpc.service], rpc.method)(rpc.request, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return rpc.unwrap(response)

    async def _pages(self, pager: Pager[T]) -> AsyncIterator[T]:
        while not pager.done:
            for item in pager.feed(await self._unary(pager.rpc)):
                yield item

    async def _image_ref(self, value: c.ImageInput) -> image_pb2.ImageRef:
        prepared = c.prepare_image(value)
        if prepared.asset is not None:
            return image_pb2.ImageRef(asset=prepared.asset)
        return image_pb2.ImageRef(asset=(await self._upload_prepared(prepared)).name)

    async def _upload_prepared(self, prepared: c.PreparedImage) -> image_pb2.Asset:
        assert prepared.data is not None
        if prepared.digest not in self._uploaded:
            try:
                asset = await self._stubs["AssetService"].UploadAsset(
                    c.upload_requests(prepared.data), metadata=self._metadata
                )
            except grpc.RpcError as err:
                raise from_rpc_error(err) from err
            self._uploaded[prepared.digest] = asset
        return self._uploaded[prepared.digest]

    async def _open_job(self, call: JobCall[Any]) -> Any:
        """Run the call's dependencies, upload its images, open its capability stream."""
        for dependency in call.dependencies:
            dependency.fill(await AsyncJobHandle(self, dependency.call).wait())
        for slot in call.images:
            slot.fill(await self._image_ref(slot.value))
        return getattr(self._stubs[call.service], call.method)(call.request, metadata=self._metadata)

    def _submit(self, call: JobCall[Any]) -> AsyncJobHandle[Any]:
        return AsyncJobHandle(self, call)

    async def close(self) -> None:
        """Close the channel (if the client made it)."""
        if self._owns_channel:
            await self.channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- jobs -------------------------------------------------------------------------------

    def attach(self, job: c.JobRef, after_seq: int = 0) -> AsyncJobHandle[Result]:
        """A handle on an existing job, replaying its events after ``after_seq``.

        Example::

            async for event in client.attach("jobs/42"):
                print(event.seq)
        """
        return AsyncJobHandle(self, name=c.job_name(job), after_seq=after_seq)

    def watch_job(self, job: c.JobRef, after_seq: int = 0) -> AsyncJobHandle[Result]:
        """Same as :meth:`attach`."""
        return self.attach(job, after_seq)

    async def get_job(self, name: c.JobRef) -> job_pb2.Job:
        """One job by name: ``await client.get_job("jobs/42")``."""
        return await self._unary(_calls.get_job(name))

    def iter_jobs(
        self, states: Iterable[int | str] = (), capability: str = "", limit: int | None = None
    ) -> AsyncIterator[job_pb2.Job]:
        """Jobs newest first, fetching pages as the caller iterates (``limit`` None: all of them).

        Example::

            async for job in client.iter_jobs(states=["failed"]):
                print(job.name)
        """
        return self._pages(_calls.list_jobs(states, capability, limit))

    async def list_jobs(
        self, states: Iterable[int | str] = (), capability: str = "", limit: int | None = 50
    ) -> list[job_pb2.Job]:
        """Jobs newest first, filtered by state and capability: ``await client.list_jobs(states=["running"])``."""
        return [job async for job in self.iter_jobs(states, capability, limit)]

    async def cancel_job(self, name: c.JobRef) -> job_pb2.Job:
        """Cancel a queued job at once or a running one at its next step."""
        return await self._unary(_calls.cancel_job(name))

    async def approve_output(self, job: c.JobRef, index: int = 0, approved: bool = True) -> job_pb2.Job:
        """Mark (or unmark) one output of a finished job: ``await client.approve_output("jobs/42", 1)``."""
        return await self._unary(_calls.approve_output(job, index, approved))

    async def list_approved(self, limit: int | None = 50) -> list[job_service_pb2.ApprovedOutput]:
        """Approved outputs, newest job first."""
        return [item async for item in self._pages(_calls.list_approved(limit))]

    # -- assets -----------------------------------------------------------------------------

    async def upload(self, source: c.ImageInput) -> image_pb2.Asset:
        """Store an image (path, bytes or PIL image) in chunks of 256 KiB: ``await client.upload("a.png")``."""
        prepared = c.prepare_image(source)
        if prepared.asset is not None:
            return await self.get_asset(prepared.asset)
        return await self._upload_prepared(prepared)

    async def download(self, asset: str | image_pb2.Asset) -> bytes:
        """The bytes of an asset."""
        request = asset_service_pb2.DownloadAssetRequest(name=c.asset_name(asset))
        parts: list[bytes] = []
        try:
            async for chunk in self._stubs["AssetService"].DownloadAsset(request, metadata=self._metadata):
                parts.append(chunk.data)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return b"".join(parts)

    async def download_image(self, asset: str | image_pb2.Asset) -> Image.Image:
        """An asset decoded as a PIL image."""
        return c.decode_image(await self.download(asset))

    async def get_asset(self, name: str | image_pb2.Asset) -> image_pb2.Asset:
        """An asset's metadata."""
        return await self._unary(_calls.get_asset(name))

    # -- system and styles ------------------------------------------------------------------

    async def status(self) -> system_service_pb2.GetStatusResponse:
        """A snapshot of the server: ``(await client.status()).profile``."""
        return await self._unary(_calls.get_status())

    async def watch_status(self, interval_ms: int = 1000) -> AsyncIterator[system_service_pb2.GetStatusResponse]:
        """Status snapshots every ``interval_ms`` until the caller stops iterating."""
        request = system_service_pb2.WatchStatusRequest(interval_ms=interval_ms)
        call = self._stubs["SystemService"].WatchStatus(request, metadata=self._metadata)
        try:
            async for snapshot in call:
                yield snapshot
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()

    async def list_models(self) -> list[system_service_pb2.ModelInfo]:
        """Every model the registry knows for the active profile."""
        return await self._unary(_calls.list_models())

    async def unload_models(self, keys: Iterable[str] = ()) -> system_service_pb2.UnloadModelsResponse:
        """Free resident models: those named, or all of them."""
        return await self._unary(_calls.unload_models(keys))

    async def list_styles(self) -> list[style_service_pb2.Style]:
        """The style LoRAs requests can stack."""
        return await self._unary(_calls.list_styles())
