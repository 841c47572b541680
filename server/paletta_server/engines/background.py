"""Background removal: BiRefNet-general through rembg (ONNX Runtime on the CPU, no VRAM).

rembg looks for ``birefnet-general.onnx`` under ``$U2NET_HOME`` and downloads it when absent;
Paletta checks the file itself first and fails fast with where to put it, so rembg never tries
the network. ``import rembg`` is slow the first time (numba), so it happens inside the loader.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from paletta_server.errors import ModelUnavailable

FILENAME = "birefnet-general.onnx"
SESSION_NAME = "birefnet-general"
_ENV_LOCK = threading.Lock()


@dataclass
class BackgroundRemover:
    session: Any
    model_file: Path
    # ONNX Runtime holds the weights in host memory; nothing is on the GPU.
    resident_bytes: int = 0

    def remove(self, image: Image.Image) -> tuple[Image.Image, Image.Image]:
        """Return (RGBA cutout, L mask) at the image's size."""
        mask = self.session.predict(image.convert("RGB"))[0].convert("L")
        if mask.size != image.size:
            mask = mask.resize(image.size, Image.Resampling.LANCZOS)
        cutout = image.convert("RGBA")
        if image.mode in ("RGBA", "LA"):
            # Keep existing transparency: the result is the smaller of both alphas.
            from PIL import ImageChops

            mask = ImageChops.darker(mask, image.getchannel("A"))
        cutout.putalpha(mask)
        return cutout, mask


def _default_homes() -> list[Path]:
    """Where rembg itself keeps models when no folder is configured."""
    homes = []
    if os.environ.get("U2NET_HOME"):
        homes.append(Path(os.path.expanduser(os.environ["U2NET_HOME"])))
    xdg = os.environ.get("XDG_DATA_HOME")
    homes.append(Path(os.path.expanduser(os.environ.get("REMBG_HOME", os.path.join(xdg, "rembg") if xdg
                                                        else "~/.rembg"))))
    homes.append(Path(os.path.expanduser(os.path.join(xdg or "~", ".u2net"))))
    return homes


def find_model_file(source: Any) -> tuple[Path | None, list[Path]]:
    """Return (the ONNX file if present, the folders searched)."""
    filename = getattr(source, "filename", "") or FILENAME
    if source.path is not None:
        path = Path(source.path)
        if path.is_file():
            return path, [path.parent]
        folders = [path]
    else:
        folders = _default_homes()
    for folder in folders:
        for candidate in (folder / filename, folder / "models" / SESSION_NAME / filename):
            if candidate.is_file():
                return candidate, folders
    return None, folders


def load_birefnet(source: Any, lc: Any) -> BackgroundRemover:
    model_file, searched = find_model_file(source)
    if model_file is None:
        where = searched[0]
        raise ModelUnavailable(
            f"{source.key}: BiRefNet-general ONNX weights not found; put {FILENAME} in {where} "
            f"(searched: {', '.join(str(p) for p in searched)}), e.g. from "
            "https://github.com/danielgatis/rembg/releases/download/v0.0.0/BiRefNet-general-epoch_244.onnx, "
            "or point PALETTA_MODEL_BIREFNET_GENERAL at the folder holding it",
            metadata={"model": source.key, "expected_path": str(where / FILENAME)},
        )
    import onnxruntime as ort
    from rembg.sessions.birefnet_general import BiRefNetSessionGeneral

    if model_file.name != FILENAME:
        # rembg finds the file by name only: load it ourselves through the same session class.
        session = BiRefNetSessionGeneral.__new__(BiRefNetSessionGeneral)
        session.model_name = SESSION_NAME
        session.inner_session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    else:
        from rembg import new_session

        # rembg reads U2NET_HOME while it builds the session; the file exists, so it downloads nothing.
        with _ENV_LOCK:
            previous = os.environ.get("U2NET_HOME")
            os.environ["U2NET_HOME"] = str(model_file.parent)
            try:
                session = new_session(SESSION_NAME, providers=["CPUExecutionProvider"])
            finally:
                if previous is None:
                    os.environ.pop("U2NET_HOME", None)
                else:
                    os.environ["U2NET_HOME"] = previous
    device = getattr(getattr(lc, "device", None), "name", "cpu")
    # On CUDA the budget is VRAM, which this model does not use; on CPU it counts host memory.
    size = 0 if device == "cuda" else model_file.stat().st_size
    return BackgroundRemover(session, model_file, size)


def remove_background(remover: BackgroundRemover, image: Image.Image) -> tuple[Image.Image, Image.Image]:
    return remover.remove(image)
