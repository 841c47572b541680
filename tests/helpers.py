"""Small helpers shared by the gRPC-level tests."""

from __future__ import annotations

import io

import grpc
import numpy as np
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image

from paletta.v1 import asset_service_pb2, asset_service_pb2_grpc, job_pb2


async def collect(stream) -> list[job_pb2.JobEvent]:
    """Read a server stream to its end (read() style, so a test may read() a few events first)."""
    events = []
    while (event := await stream.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


def kinds(events: list[job_pb2.JobEvent]) -> list[str]:
    return [e.WhichOneof("kind") for e in events]


def field_violations(error: grpc.aio.AioRpcError | status_pb2.Status) -> dict[str, str]:
    """BadRequest field → description from a rich error status (a call's, or a failed job's Job.error)."""
    status = error if isinstance(error, status_pb2.Status) else rpc_status.from_call(error)
    found: dict[str, str] = {}
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found


def error_info(error: grpc.aio.AioRpcError | status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    status = error if isinstance(error, status_pb2.Status) else rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def error_reason(error: grpc.aio.AioRpcError | status_pb2.Status) -> str:
    """The ErrorInfo reason of a call's error or of a failed job's Job.error ("" without one)."""
    info = error_info(error)
    return info.reason if info is not None else ""


async def download(channel: grpc.aio.Channel, name: str) -> bytes:
    stub = asset_service_pb2_grpc.AssetServiceStub(channel)
    return b"".join([c.data async for c in stub.DownloadAsset(asset_service_pb2.DownloadAssetRequest(name=name))])


async def download_image(channel: grpc.aio.Channel, name: str) -> Image.Image:
    return Image.open(io.BytesIO(await download(channel, name)))


async def upload(channel: grpc.aio.Channel, data: bytes, chunk: int = 256 * 1024):
    stub = asset_service_pb2_grpc.AssetServiceStub(channel)

    async def chunks():
        for i in range(0, len(data), chunk):
            yield asset_service_pb2.UploadAssetRequest(data=data[i:i + chunk])

    return await stub.UploadAsset(chunks())


def png_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def face_photo(seed: int = 1, small_face: bool = True) -> Image.Image:
    """256² black photo with a 128² face (a bright 2x2 block for the tiny detector) and, optionally,
    a 64² one in the top-right corner. Faces are stripes of 150 / 255 (mean above the detector's
    threshold), vertical for odd seeds and horizontal for even ones, plus seeded noise: the seed
    changes the ArcFace embedding and the crop."""
    rng = np.random.default_rng(seed)
    stripes = np.where((np.arange(128) // 4) % 2 == 0, 255, 150)
    pattern = np.tile(stripes, (128, 1)) if seed % 2 else np.tile(stripes[:, None], (1, 128))
    texture = np.clip(pattern[..., None] - rng.integers(0, 12, (128, 128, 3)), 0, 255).astype(np.uint8)
    rgb = np.zeros((256, 256, 3), np.uint8)
    rgb[64:192, 64:192] = texture
    if small_face:
        rgb[0:64, 192:256] = texture[::2, ::2]
    return Image.fromarray(rgb, "RGB")
