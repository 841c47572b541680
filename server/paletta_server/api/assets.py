"""AssetService: chunked upload, chunked download, metadata."""

from __future__ import annotations

import asyncio

import grpc

from paletta.v1 import asset_service_pb2, asset_service_pb2_grpc, image_pb2
from paletta_server.app import PalettaApp
from paletta_server.storage import AssetInfo

CHUNK = 1 << 20


def asset_message(info: AssetInfo) -> image_pb2.Asset:
    return image_pb2.Asset(name=info.name, mime=info.mime, width=info.width, height=info.height,
                           size_bytes=info.size_bytes)


class AssetServicer(asset_service_pb2_grpc.AssetServiceServicer):
    def __init__(self, app: PalettaApp):
        self.assets = app.assets

    async def UploadAsset(self, request_iterator, context: grpc.aio.ServicerContext) -> image_pb2.Asset:
        upload = await asyncio.to_thread(self.assets.begin_upload)
        try:
            async for chunk in request_iterator:
                # Refuses as soon as the size limit is crossed instead of buffering the rest.
                await asyncio.to_thread(upload.write, chunk.data)
            return asset_message(await asyncio.to_thread(upload.commit, "data"))
        finally:
            await asyncio.to_thread(upload.abort)

    async def DownloadAsset(self, request: asset_service_pb2.DownloadAssetRequest, context: grpc.aio.ServicerContext):
        path = self.assets.path(request.name)
        with path.open("rb") as fh:
            while True:
                data = await asyncio.to_thread(fh.read, CHUNK)
                if not data:
                    break
                yield asset_service_pb2.AssetChunk(data=data)

    async def GetAsset(self, request: asset_service_pb2.GetAssetRequest, context: grpc.aio.ServicerContext
                       ) -> image_pb2.Asset:
        return asset_message(self.assets.get(request.name))
