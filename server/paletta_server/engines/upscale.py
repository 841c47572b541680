"""Real-ESRGAN x4plus through spandrel, with a tiler that keeps memory bounded; LANCZOS otherwise.

The tiler never puts the whole image on the device: it cuts the input into ``tile``-sized cells,
runs each one with ``overlap`` pixels of context on every side, keeps only the cell's own part
of the result and writes it into a preallocated uint8 output array. Device memory therefore
depends on ``tile`` and ``overlap`` only, whatever the image size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from paletta_server.errors import ModelUnavailable

DEFAULT_TILE = 256
DEFAULT_OVERLAP = 16
REALESRGAN = "realesrgan"
LANCZOS = "lanczos"


def _model_file(source: Any) -> Path:
    """The weights file of a source: a local file, a file inside a local folder, or a Hub download."""
    if source.path is not None:
        path = Path(source.path)
        if path.is_file():
            return path
        if source.filename and (path / source.filename).is_file():
            return path / source.filename
        found = sorted(p for ext in ("*.pth", "*.safetensors") for p in path.glob(ext))
        if len(found) == 1:
            return found[0]
        raise ModelUnavailable(
            f"{source.key}: no weights file {source.filename or '*.pth'} in {path}; put RealESRGAN_x4plus "
            f"(.pth or .safetensors) there",
            metadata={"model": source.key},
        )
    if source.repo.startswith(("https://", "http://", "file://")):
        return _download(source.repo, source.filename or source.repo.rsplit("/", 1)[1])
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(source.repo, source.filename, revision=source.revision or None))


DOWNLOAD_TIMEOUT_S = 30.0  # per network read: a stalled download fails the job, never holds the device


def _download(url: str, filename: str) -> Path:
    """A release file, fetched once into torch's checkpoint cache (where torch.hub keeps weights):
    into a temporary file, kept only when it has every byte the server announced."""
    import shutil
    import tempfile
    import urllib.request

    import torch
    from huggingface_hub import constants

    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if target.is_file():
        return target
    if constants.HF_HUB_OFFLINE:  # the one offline switch (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)
        raise FileNotFoundError(f"{target} is not there, and offline mode is on, so {url} is not fetched")
    target.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, \
            tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{filename}.", delete=False) as part:
        try:
            shutil.copyfileobj(response, part)
            part.flush()
            expected = response.headers.get("Content-Length")
            if expected is not None and part.tell() != int(expected):
                raise ConnectionError(f"{url}: got {part.tell()} of {expected} bytes")
        except BaseException:
            Path(part.name).unlink(missing_ok=True)
            raise
    os.replace(part.name, target)
    return target


def load_realesrgan(source: Any, lc: Any) -> Any:
    """Load an ESRGAN-family model (RealESRGAN_x4plus) with spandrel; returns an ImageModelDescriptor."""
    import torch
    from spandrel import ImageModelDescriptor, ModelLoader

    path = _model_file(source)
    try:
        descriptor = ModelLoader().load_from_file(str(path))
    except RuntimeError as exc:  # a truncated or corrupt checkpoint: say which file, not a generic error
        raise ValueError(f"{path} is not a readable checkpoint ({str(exc)[:200]}); delete or replace it") from exc
    if not isinstance(descriptor, ImageModelDescriptor):
        kind = type(descriptor).__name__
        raise ValueError(f"{path} is not an image-to-image model (spandrel found {kind})")
    device = getattr(lc.device, "name", "cpu") if lc is not None else "cpu"
    descriptor.to(torch.device(device))
    if device == "cuda" and getattr(lc.device, "quantization", "fp32") != "fp32" and descriptor.supports_half:
        descriptor.half()
    descriptor.eval()
    return descriptor


def tile_grid(width: int, height: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Cells (x0, y0, x1, y1) covering the image, row by row."""
    cells = []
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            cells.append((x0, y0, min(x0 + tile, width), min(y0 + tile, height)))
    return cells


def tile_count(width: int, height: int, tile: int) -> int:
    return math.ceil(width / tile) * math.ceil(height / tile)


def upscale_tiled(model: Any, image: Image.Image, scale: float | None = None, tile: int = DEFAULT_TILE,
                  overlap: int = DEFAULT_OVERLAP,
                  on_tile: Callable[[int, int], None] | None = None) -> Image.Image:
    """Upscale with the model tile by tile; then LANCZOS to ``scale`` if it differs from the model's.

    ``on_tile(done, total)`` is called after every tile (and may raise to cancel).
    Alpha, if any, is upscaled with LANCZOS and reattached.
    """
    import numpy as np
    import torch

    net_scale = int(getattr(model, "scale", 4))
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    out = np.empty((height * net_scale, width * net_scale, 3), dtype=np.uint8)
    param = next(iter(model.model.parameters()))
    device, dtype = param.device, param.dtype
    cells = tile_grid(width, height, tile)
    with torch.inference_mode():
        for done, (x0, y0, x1, y1) in enumerate(cells, start=1):
            # The cell plus `overlap` pixels of context on each side (clamped to the image).
            px0, py0 = max(x0 - overlap, 0), max(y0 - overlap, 0)
            px1, py1 = min(x1 + overlap, width), min(y1 + overlap, height)
            patch = torch.from_numpy(np.array(rgb[py0:py1, px0:px1])).to(device)  # a copy: rgb is read-only
            patch = patch.permute(2, 0, 1).unsqueeze(0).to(dtype).div_(255.0)
            result = model(patch)
            # Keep only the cell's own region of the result: the context is cropped away.
            cx0, cy0 = (x0 - px0) * net_scale, (y0 - py0) * net_scale
            cx1, cy1 = cx0 + (x1 - x0) * net_scale, cy0 + (y1 - y0) * net_scale
            crop = result[0, :, cy0:cy1, cx0:cx1].float().clamp_(0, 1).mul_(255.0).round_()
            out[y0 * net_scale:y1 * net_scale, x0 * net_scale:x1 * net_scale] = (
                crop.to(torch.uint8).permute(1, 2, 0).cpu().numpy())
            del patch, result, crop
            if on_tile is not None:
                on_tile(done, len(cells))
    upscaled = Image.fromarray(out, "RGB")
    del out
    if alpha is not None:
        upscaled.putalpha(alpha.resize(upscaled.size, Image.Resampling.LANCZOS))
    if scale is not None and abs(scale - net_scale) > 1e-6:
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        upscaled = upscaled.resize(target, Image.Resampling.LANCZOS)
    return upscaled


def lanczos(image: Image.Image, scale: float) -> Image.Image:
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _is_realesrgan(upscaler: Any) -> bool:
    if isinstance(upscaler, str):
        return upscaler.lower().replace("-", "").replace("_", "") in ("realesrgan", "upscalerrealesrgan")
    from paletta.v1 import image_pb2

    return upscaler == image_pb2.UPSCALER_REALESRGAN


def restore_size(image: Image.Image, size: tuple[int, int], upscaler: Any = LANCZOS, model: Any = None,
                 tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                 on_tile: Callable[[int, int], None] | None = None) -> Image.Image:
    """Bring a diffusion output back to ``size`` (width, height).

    ``upscaler`` is "lanczos"/"realesrgan" or an ``Upscaler`` enum value. With Real-ESRGAN (and a
    model) an image smaller than the target is first upscaled 4x by the model, then LANCZOS gives
    the exact size; otherwise LANCZOS alone.
    """
    size = (int(size[0]), int(size[1]))
    if image.size == size:
        return image
    if model is not None and _is_realesrgan(upscaler) and (image.width < size[0] or image.height < size[1]):
        image = upscale_tiled(model, image, None, tile, overlap, on_tile)
        if image.size == size:
            return image
    return image.resize(size, Image.Resampling.LANCZOS)
