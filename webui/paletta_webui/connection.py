"""What every tab of the page shares in one process: the SDK client, one WatchStatus stream,
and the on-disk cache behind the ``/outputs/{sha}`` route."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from fastapi import HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from nicegui import Event, app, background_tasks

import paletta
from paletta.v1 import system_service_pb2

# Reconnect quickly after a server restart (grpc's default backoff grows to two minutes).
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 300), ("grpc.max_reconnect_backoff_ms", 2000)]
SERVE_HINT = "paletta serve --profile tiny"
_SHA = re.compile(r"^[0-9a-f]{64}$")
_MIME = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"RIFF": "image/webp"}
MAX_INPUT_BYTES = 64 * 1024 * 1024


def sniff_mime(head: bytes) -> str:
    return next((mime for magic, mime in _MIME.items() if head.startswith(magic)), "application/octet-stream")


class StatusHub:
    """One ``WatchStatus`` stream for the whole process; tabs subscribe to ``changed``.

    When the stream fails the hub is offline (tabs show a banner) and it retries every second.
    """

    def __init__(self, client: paletta.AsyncClient, interval_ms: int = 1000, retry_s: float = 1.0) -> None:
        self.client = client
        self.interval_ms = interval_ms
        self.retry_s = retry_s
        self.latest: system_service_pb2.GetStatusResponse | None = None
        self.online: bool | None = None  # None until the first answer or failure
        self.error = ""
        self.changed: Event[[]] = Event()
        self.reconnected: Event[[]] = Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = background_tasks.create(self._run(), name="paletta-watch-status")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self) -> None:
        while True:
            try:
                async for snapshot in self.client.watch_status(self.interval_ms):
                    was_offline = self.online is False
                    self.latest, self.online, self.error = snapshot, True, ""
                    self.changed.emit()
                    if was_offline:
                        self.reconnected.emit()
            except paletta.PalettaError as err:
                self.error = err.message or err.code.name
            else:
                self.error = "the status stream ended"
            self.online = False
            self.changed.emit()
            await asyncio.sleep(self.retry_s)


class Connection:
    """The shared client, status hub and output cache; ``install`` adds the page's routes."""

    def __init__(self, client_factory: Callable[[], paletta.AsyncClient], cache_dir: Path | None = None) -> None:
        self._factory = client_factory
        self._client: paletta.AsyncClient | None = None
        self._hub: StatusHub | None = None
        self.cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "paletta-webui-cache")
        self.installed = False

    @property
    def client(self) -> paletta.AsyncClient:
        if self._client is None:  # made inside the running loop (grpc.aio wants one)
            self._client = self._factory()
        return self._client

    @property
    def hub(self) -> StatusHub:
        if self._hub is None:
            self._hub = StatusHub(self.client)
        return self._hub

    @property
    def address(self) -> str:
        return getattr(self.client, "address", "")

    def install(self) -> None:
        """Register the routes and the shutdown hook once (after NiceGUI set its app up)."""
        if self.installed:
            return
        self.installed = True
        app.add_api_route("/outputs/{sha}", self.output_route, methods=["GET"], include_in_schema=False)
        app.add_api_route("/inputs", self.input_route, methods=["POST"], include_in_schema=False)
        app.on_shutdown(self.close)
        self.hub.start()

    async def close(self) -> None:
        """Stop the status stream and close the client (NiceGUI's shutdown)."""
        if self._hub is not None:
            await self._hub.stop()
        if self._client is not None:
            await self._client.close()
        self._client, self._hub, self.installed = None, None, False

    async def output_path(self, sha: str) -> Path:
        """The cached file of ``assets/{sha}``, fetched from the server once."""
        path = self.cache_dir / sha
        if not path.exists():
            data = await self.client.download(f"assets/{sha}")
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return path

    async def output_route(self, sha: str, download: int = 0) -> FileResponse:
        if not _SHA.match(sha):
            raise HTTPException(404, "not an asset")
        try:
            path = await self.output_path(sha)
        except paletta.NotFound:
            raise HTTPException(404, f"assets/{sha} is not on the server") from None
        except paletta.PalettaError as err:
            raise HTTPException(502, str(err)) from None
        with path.open("rb") as f:
            mime = sniff_mime(f.read(4))
        ext = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}.get(mime, "bin")
        headers = {"Cache-Control": "public, max-age=31536000, immutable"}
        if download:
            headers["Content-Disposition"] = f'attachment; filename="paletta-{sha[:12]}.{ext}"'
        return FileResponse(path, media_type=mime, headers=headers)

    async def input_route(self, request: Request) -> JSONResponse:
        """A dropped or pasted image (the raw body): stored on the server, answered with its asset."""
        data = await request.body()
        if not data or len(data) > MAX_INPUT_BYTES:
            return JSONResponse({"error": "empty or too large"}, status_code=413)
        try:
            asset = await self.client.upload(data)
        except paletta.PalettaError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        return JSONResponse({"asset": asset.name, "width": asset.width, "height": asset.height})
