"""Helpers shared by engines: device and dtype choice, byte measurement, cancellation-aware callbacks."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from paletta_server.models.types import ModelSource


class ProgressSink(Protocol):
    """What an engine reports to; implemented by the job runner."""

    def progress(self, step: int, total: int, stage: str) -> None: ...

    def preview(self, image: Any, step: int) -> None: ...

    def check_cancelled(self) -> None:
        """Raise JobCancelled if the job was cancelled."""


def pretrained_location(source: ModelSource) -> tuple[str, dict[str, Any]]:
    """(folder or repo id, from_pretrained kwargs) for a registry source: local files only, or a revision."""
    if source.local:
        return str(source.path), {"local_files_only": True}
    return source.repo, {"revision": source.revision or None}


def load_transformers(model_cls: Any, processor_cls: Any, source: ModelSource, lc: Any,
                      **model_kwargs: Any) -> tuple[Any, Any]:
    """A transformers model (eval mode, on the device) and its processor or tokenizer, from a source."""
    where, kwargs = pretrained_location(source)
    processor = processor_cls.from_pretrained(where, **kwargs)
    model = model_cls.from_pretrained(where, **model_kwargs, **kwargs).eval()
    return model.to(getattr(lc.device, "name", "cpu")), processor


def import_object(dotted: str) -> Any:
    """Resolve "package.module:attribute"."""
    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)


def tensor_bytes(tensor: Any) -> int:
    """Bytes a tensor holds. A wrapper subclass (torchao's float8 weights: one byte a weight plus
    per-row scales) reports the dtype it stands for, so its inner tensors are counted instead."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def measure_bytes(obj: Any) -> int:
    """Bytes of parameters and buffers of every torch module reachable from obj (pipelines, models).
    A LoRA is resident as its file's path: it costs its size inside the pipeline it is loaded into."""
    explicit = getattr(obj, "resident_bytes", None)
    if isinstance(explicit, int):
        return explicit
    if isinstance(obj, Path):
        return obj.stat().st_size if obj.is_file() else 0
    import torch

    seen: set[int] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.nn.Module):
            for tensor in list(value.parameters()) + list(value.buffers()):
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    total += tensor_bytes(tensor)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        visit(components)
    else:
        visit(obj)
        for name in ("model", "processor"):
            if hasattr(obj, name) and not isinstance(obj, torch.nn.Module):
                visit(getattr(obj, name))
    return total


class PendingPreview:
    """A preview's pixels on their way to the host: on CUDA by an asynchronous copy, ready once it
    has landed (so a preview never makes the device thread wait for the GPU); elsewhere at once."""

    def __init__(self, pixels: Any, event: Any = None):
        self._pixels = pixels  # (h, w, 3) uint8, on the host
        self._event = event

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def image(self) -> Any:
        from PIL import Image

        return Image.fromarray(self._pixels.numpy(), "RGB")


def linear_preview(latents: Any, weights: Any) -> PendingPreview:
    """Latents (C, h, w) → RGB by a (C + 1, 3) linear map (the last row the bias), computed where
    the latents are (keep ``weights`` there: moving them makes the device thread wait)."""
    import torch

    with torch.no_grad():
        weights = weights.to(latents.device)  # no-op when they are there already
        c, h, w = latents.shape
        rgb = torch.addmm(weights[-1], latents.reshape(c, -1).T.float(), weights[:-1])  # (h * w, 3)
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).reshape(h, w, 3)
        if not pixels.is_cuda:
            return PendingPreview(pixels.cpu())
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(pixels.device))  # the stream the copy was queued on
        return PendingPreview(host, event)


def step_callback(sink: ProgressSink, total: int, start_preview: Callable[[Any], PendingPreview] | None = None,
                  preview_every: int = 2) -> Callable:
    """A diffusers ``callback_on_step_end``: reports progress, previews, and stops on cancel.

    A preview is started from the step's latents and sent at the first step (this one or a later
    one) at which its pixels are on the host; one still on its way when the pipeline ends is
    dropped (the image itself follows): on a GPU, previews are best effort."""
    pending: list[tuple[int, PendingPreview]] = []

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        sink.check_cancelled()
        done = step + 1
        sink.progress(done, total, "denoising")
        if start_preview is not None and done < total and done % preview_every == 0 and "latents" in kwargs:
            pending.append((done, start_preview(kwargs["latents"])))
        while pending and pending[0][1].ready():
            at, preview = pending.pop(0)
            sink.preview(preview.image(), at)
        return kwargs

    return callback


def free_device_memory() -> None:
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
