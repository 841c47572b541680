"""The asyncio client (``grpc.aio``) and its job handle."""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message
from PIL import Image

from paletta import _common as c
from paletta._capabilities import Capabilities, ImageSlot
from paletta._stubs import make_stubs
from paletta.client import _TERMINAL, Backoff
from paletta.errors import PalettaError, from_rpc_error
from paletta.v1 import (
    asset_service_pb2,
    image_pb2,
    job_pb2,
    job_service_pb2,
    style_service_pb2,
    system_service_pb2,
)


class AsyncJobHandle:
    """One job, for asyncio code: ``async for`` its events, ``await`` its end, get its images.

    Re-attaches with ``WatchJob(after_seq=last seen seq)`` after a dropped stream.

    Example::

        job = await client.generate("a knight")
        async for event in job:
            if event.HasField("preview"):
                show(event.preview.jpeg)
        async for image in job.images():
            image.save("knight.png")
    """

    def __init__(
        self,
        client: AsyncClient,
        open_stream: Callable[[], Any] | None = None,
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

    async def _read(self) -> job_pb2.JobEvent | None:
        """The next message of the open stream, None at its end."""
        message = await self._stream.read()
        return None if message is grpc.aio.EOF else message

    async def _start(self) -> AsyncJobHandle:
        assert self._open_stream is not None
        self._stream = self._open_stream()
        self._open_stream = None
        try:
            event = await self._read()
        except grpc.RpcError as err:
            self._stream = None
            raise from_rpc_error(err) from err
        if event is None:
            self._stream = None
            raise PalettaError("the server ended the job stream without any event")
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
        return f"<AsyncJobHandle {self.name} {state} seq={self.last_seq}>"

    async def _retry(self, error: PalettaError | grpc.RpcError) -> None:
        code = error.code() if isinstance(error, grpc.RpcError) else error.code  # type: ignore[attr-defined]
        converted = from_rpc_error(error) if isinstance(error, grpc.RpcError) else error
        if not self.name or code not in c.REATTACH_CODES:
            raise converted
        delay = self._backoff.next_delay()
        if delay is None:
            raise converted
        await asyncio.sleep(delay)
        self.reattach_count += 1

    async def _settle_ended_stream(self) -> None:
        job = await self._client.get_job(self.name)
        if job.state in _TERMINAL:
            self._tracker.final = job
            for output in job.outputs:
                self._tracker.outputs.setdefault(output.index, output)
        else:
            await self._retry(PalettaError("job stream ended early", code=grpc.StatusCode.UNAVAILABLE))

    async def _next_event(self) -> job_pb2.JobEvent | None:
        while True:
            if self._buffer:
                return self._buffer.popleft()
            if self._tracker.done:
                return None
            try:
                if self._stream is None:
                    request = job_service_pb2.WatchJobRequest(job=self.name, after_seq=self.last_seq)
                    self._stream = self._client._stubs["JobService"].WatchJob(request, metadata=self._client._metadata)
                event = await self._read()
            except grpc.RpcError as err:
                self._stream = None
                await self._retry(err)
                continue
            if event is None:
                self._stream = None
                try:
                    await self._settle_ended_stream()
                except PalettaError as err:
                    await self._retry(err)
                continue
            if self._tracker.accept(event):
                self._backoff.reset()
                return event

    async def __aiter__(self) -> AsyncIterator[job_pb2.JobEvent]:
        while (event := await self._next_event()) is not None:
            yield event

    async def wait(self) -> job_pb2.Job:
        """Follow the job to its end and return the final Job; raises JobFailed unless it succeeded.

        Example::

            job = await (await client.generate("a knight")).wait()
        """
        async for _ in self:
            pass
        return self._tracker.check()

    async def outputs(self) -> AsyncIterator[job_pb2.JobOutput]:
        """Each output as soon as it is stored, in order; raises JobFailed at the end if the job failed."""
        seen: set[int] = set()
        for output in self._tracker.sorted_outputs():
            seen.add(output.index)
            yield output
        async for event in self:
            if event.HasField("output") and event.output.index not in seen:
                seen.add(event.output.index)
                yield event.output
        for output in self._tracker.sorted_outputs():
            if output.index not in seen:
                seen.add(output.index)
                yield output
        self._tracker.check()

    async def images(self) -> AsyncIterator[Image.Image]:
        """The output images as PIL images, downloaded as they are stored."""
        async for output in self.outputs():
            if output.HasField("asset") and output.asset.name:
                yield await self._client.download_image(output.asset.name)

    async def image(self) -> Image.Image:
        """The first output image."""
        async for image in self.images():
            return image
        raise PalettaError(f"job {self.name} has no image output", code=grpc.StatusCode.NOT_FOUND)

    async def results(self) -> list[c.Result]:
        """The typed results (Detections, Caption, PromptExpansion, Segmentation) of all outputs."""
        await self.wait()
        return [r for r in (c.output_result(o) for o in self._tracker.sorted_outputs()) if r is not None]

    async def cancel(self) -> job_pb2.Job:
        """Ask the server to cancel the job."""
        return await self._client.cancel_job(self.name)

    def close(self) -> None:
        """Stop following the job (the job itself goes on)."""
        if self._stream is not None:
            self._stream.cancel()
        self._stream = None


class AsyncClient(Capabilities[Awaitable[AsyncJobHandle]]):
    """asyncio Paletta client on ``grpc.aio``; the same calls as :class:`~paletta.Client`, awaited.

    Example::

        async with paletta.AsyncClient("127.0.0.1:50051") as client:
            job = await client.generate("a knight", seed=1)
            async for event in job:
                ...
            (await job.image()).save("knight.png")
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
        self.address = address
        self.reconnect_timeout = reconnect_timeout
        self._metadata = c.auth_metadata(token)
        self._uploaded: dict[str, image_pb2.Asset] = {}
        if channel is None:
            opts = [*c.CHANNEL_OPTIONS, *options]
            root = c.read_root_cert(tls_root_cert)
            if root is not None or tls:
                creds = grpc.ssl_channel_credentials(root_certificates=root)
                channel = grpc.aio.secure_channel(address, creds, options=opts)
            else:
                channel = grpc.aio.insecure_channel(address, options=opts)
            self._owns_channel = True
        else:
            self._owns_channel = False
        self.channel = channel
        self._stubs = make_stubs(channel)

    async def _unary(self, service: str, method: str, request: Message) -> Any:
        try:
            return await getattr(self._stubs[service], method)(request, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    async def _upload_prepared(self, prepared: c.PreparedImage) -> image_pb2.Asset:
        assert prepared.data is not None
        digest = prepared.digest
        if digest not in self._uploaded:
            try:
                asset = await self._stubs["AssetService"].UploadAsset(
                    c.upload_requests(prepared.data), metadata=self._metadata
                )
            except grpc.RpcError as err:
                raise from_rpc_error(err) from err
            self._uploaded[digest] = asset
        return self._uploaded[digest]

    async def _image_ref(self, value: c.ImageInput) -> image_pb2.ImageRef:
        prepared = c.prepare_image(value)
        if prepared.asset is not None:
            return image_pb2.ImageRef(asset=prepared.asset)
        return image_pb2.ImageRef(asset=(await self._upload_prepared(prepared)).name)

    async def _start(  # type: ignore[override]
        self, service: str, method: str, request: Message, images: list[ImageSlot]
    ) -> AsyncJobHandle:
        for slot in images:
            getattr(slot.parent, slot.field).CopyFrom(await self._image_ref(slot.value))
        call = getattr(self._stubs[service], method)
        return await AsyncJobHandle(self, lambda: call(request, metadata=self._metadata))._start()

    async def close(self) -> None:
        """Close the channel (if the client made it)."""
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- jobs -------------------------------------------------------------------------------

    def attach(self, job: str | job_pb2.Job, after_seq: int = 0) -> AsyncJobHandle:
        """A handle on an existing job, replaying its events after ``after_seq``.

        Example::

            async for event in client.attach("jobs/42"):
                print(event.seq)
        """
        return AsyncJobHandle(self, name=c.job_name(job), after_seq=after_seq)

    def watch_job(self, job: str | job_pb2.Job, after_seq: int = 0) -> AsyncJobHandle:
        """Same as :meth:`attach`."""
        return self.attach(job, after_seq)

    async def get_job(self, name: str | job_pb2.Job) -> job_pb2.Job:
        """One job by name."""
        return await self._unary("JobService", "GetJob", job_service_pb2.GetJobRequest(name=c.job_name(name)))

    async def list_jobs(
        self, states: Iterable[int | str] = (), capability: str = "", limit: int | None = 50
    ) -> list[job_pb2.Job]:
        """Jobs newest first, filtered by state and capability.

        Example::

            running = await client.list_jobs(states=["running"])
        """
        request = job_service_pb2.ListJobsRequest(states=[c.job_state(s) for s in states], capability=capability)
        return await self._collect_pages("ListJobs", request, "jobs", limit)

    async def cancel_job(self, name: str | job_pb2.Job) -> job_pb2.Job:
        """Cancel a queued job at once or a running one at its next step."""
        return await self._unary("JobService", "CancelJob", job_service_pb2.CancelJobRequest(name=c.job_name(name)))

    async def approve_output(
        self, job: str | job_pb2.Job | AsyncJobHandle, index: int = 0, approved: bool = True
    ) -> job_pb2.Job:
        """Mark (or unmark) one output of a finished job as chosen.

        Example::

            await client.approve_output("jobs/42", index=1)
        """
        request = job_service_pb2.ApproveOutputRequest(job=c.job_name(job), index=index, approved=approved)
        return await self._unary("JobService", "ApproveOutput", request)

    async def list_approved(self, limit: int | None = 50) -> list[job_service_pb2.ApprovedOutput]:
        """Approved outputs, newest job first."""
        request = job_service_pb2.ListApprovedOutputsRequest()
        return await self._collect_pages("ListApprovedOutputs", request, "outputs", limit)

    async def _collect_pages(self, method: str, request: Any, field: str, limit: int | None) -> list[Any]:
        """The ``field`` items of a paged JobService list call, up to ``limit`` (None: all)."""
        out: list[Any] = []
        request.page_size = min(limit or 0, 1000)
        while True:
            page = await self._unary("JobService", method, request)
            for item in getattr(page, field):
                out.append(item)
                if limit is not None and len(out) >= limit:
                    return out
            if not page.next_page_token:
                return out
            request.page_token = page.next_page_token

    # -- assets -----------------------------------------------------------------------------

    async def upload(self, source: c.ImageInput) -> image_pb2.Asset:
        """Store an image (path, bytes or PIL image) in chunks of 256 KiB; returns its Asset."""
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
        return await self._unary("AssetService", "GetAsset", asset_service_pb2.GetAssetRequest(name=c.asset_name(name)))

    # -- system and styles ------------------------------------------------------------------

    async def status(self) -> system_service_pb2.GetStatusResponse:
        """A snapshot of the server: device, profile, memory, loaded models, queue.

        Example::

            s = await client.status()
            print(s.device, s.profile)
        """
        return await self._unary("SystemService", "GetStatus", system_service_pb2.GetStatusRequest())

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
        return list((await self._unary("SystemService", "ListModels", system_service_pb2.ListModelsRequest())).models)

    async def unload_models(self, keys: Iterable[str] = ()) -> system_service_pb2.UnloadModelsResponse:
        """Free resident models: those named, or all of them."""
        request = system_service_pb2.UnloadModelsRequest(keys=list(keys))
        return await self._unary("SystemService", "UnloadModels", request)

    async def list_styles(self) -> list[style_service_pb2.Style]:
        """The style LoRAs requests can stack."""
        return list((await self._unary("StyleService", "ListStyles", style_service_pb2.ListStylesRequest())).styles)
