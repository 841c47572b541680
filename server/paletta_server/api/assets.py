"""AssetService: chunked upload, chunked download, metadata."""

from __future__ import annotations

import asyncio

import grpc

from paletta.v1 import asset_service_pb2, asset_service_pb2_grpc, image_pb2
from paletta_server.api.errors import abort, streaming, unary
from paletta_server.app import PalettaApp
from paletta_server.errors import PalettaError, ResourceExhausted
from paletta_server.storage import AssetInfo

CHUNK = 1 << 20


def asset_message(info: AssetInfo) -> image_pb2.Asset:
    return image_pb2.Asset(name=info.name, mime=info.mime, width=info.width, height=info.height,
                           size_bytes=info.size_bytes)


class AssetServicer(asset_service_pb2_grpc.AssetServiceServicer):
    def __init__(self, app: PalettaApp):
        self.assets = app.assets

    async def UploadAsset(self, request_iterator, context: grpc.aio.ServicerContext) -> image_pb2.Asset:
        try:
            parts: list[bytes] = []
            size = 0
            async for chunk in request_iterator:
                size += len(chunk.data)
                if size > self.assets.max_bytes:
                    # Refuse as soon as the limit is crossed instead of buffering the rest.
                    raise ResourceExhausted(f"data: upload exceeds the limit of {self.assets.max_bytes} bytes",
                                            reason="ASSET_TOO_LARGE")
                parts.append(chunk.data)
            info = await asyncio.to_thread(self.assets.put_image_bytes, b"".join(parts), "data")
            return asset_message(info)
        except PalettaError as exc:
            await abort(context, exc)

    @streaming
    async def DownloadAsset(self, request: asset_service_pb2.DownloadAssetRequest, context: grpc.aio.ServicerContext):
        path = self.assets.path(request.name)
        with path.open("rb") as fh:
            while True:
                data = await asyncio.to_thread(fh.read, CHUNK)
                if not data:
                    break
                yield asset_service_pb2.AssetChunk(data=data)

    @unary
    async def GetAsset(self, request: asset_service_pb2.GetAssetRequest, context: grpc.aio.ServicerContext
                       ) -> image_pb2.Asset:
        return asset_message(self.assets.get(request.name))
