"""Vision and helper figures (called by ``python -m tests.bench``; also runnable alone).

- ``upscale_peak_memory()``: peak memory of a tiny-RRDBNet Real-ESRGAN upscale with a fixed tile
  at 512², 1024² and 2048² input. On CUDA it is ``torch.cuda.max_memory_allocated`` (VRAM: only
  tiles go to the device); on CPU it is the peak RSS growth while tiling minus the part of the
  uint8 output array already written (the result itself necessarily grows with the image: 48
  bytes per input pixel at 4x). Either way it must stay roughly flat as the image grows.
- ``direct_vs_grpc(folder)``: seconds per capability through a real aio server on the tiny models
  (built into ``folder`` by the registry builders, loaded by the registry loaders), and of the
  same engine work called directly on the server's resident models on its device thread;
  ``report`` prints the ratio.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

SIZES = (512, 1024, 2048)
TILE, OVERLAP = 256, 16
IMAGE_SIZE = (256, 192)
RUNS = 5

BUILDERS = {
    "realesrgan-x4plus": "build_realesrgan", "birefnet-general": "build_birefnet", "clipseg": "build_clipseg",
    "detr-resnet-50": "build_detr", "owlv2": "build_owlv2", "blip-large": "build_blip",
    "blip2-opt-2.7b": "build_blip2", "qwen2.5-1.5b-instruct": "build_qwen_llm",
}


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tiny_model(folder: Path, key: str) -> object:
    from paletta_server.engines.common import import_object
    from paletta_server.engines.tiny import vision
    from paletta_server.models.registry import SPECS, ModelSource
    from paletta_server.models.types import Device

    spec = next(s for s in SPECS if s.key == key)
    path = folder / key
    if not (path / ".complete").exists():
        path.mkdir(parents=True, exist_ok=True)
        getattr(vision, BUILDERS[key])(path)
        (path / ".complete").touch()
    import torch

    device = Device("cuda", "bf16") if torch.cuda.is_available() else Device("cpu", "fp32")
    lc = SimpleNamespace(device=device, profile=None, source_of=None)
    return import_object(spec.loader)(ModelSource(key, path=path, filename=spec.filename), lc)


def _cpu_working_peak(model: object, image: Image.Image) -> tuple[Image.Image, int]:
    """Upscale on CPU; return (result, peak working bytes while tiling).

    Working memory is the RSS growth minus the part of the uint8 output array written so far
    (rows fill in order, so that is the finished fraction of 3 bytes per output pixel).
    """
    from paletta_server.engines import upscale

    out_bytes = 16 * image.width * image.height * 3
    total = upscale.tile_count(image.width, image.height, TILE)
    state = {"done": 0, "peak": 0.0}
    stop = threading.Event()
    base = _rss()

    def on_tile(done: int, total_tiles: int) -> None:
        state["done"] = done

    def sample() -> None:
        while not stop.is_set():
            state["peak"] = max(state["peak"], _rss() - base - out_bytes * state["done"] / total)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = upscale.upscale_tiled(model, image, 4, TILE, OVERLAP, on_tile)
    finally:
        stop.set()
        sampler.join()
    return out, int(max(0.0, state["peak"]))


def upscale_peak_memory(folder: Path | None = None, sizes: tuple[int, ...] = SIZES) -> list[tuple[int, int]]:
    """[(input edge, peak bytes)] for a fixed-tile (256, overlap 16) tiny Real-ESRGAN 4x upscale."""
    import gc
    import tempfile

    import torch

    from paletta_server.engines import upscale

    folder = Path(folder or tempfile.mkdtemp(prefix="paletta-vision-"))
    model = _tiny_model(folder, "realesrgan-x4plus")
    upscale.upscale_tiled(model, Image.new("RGB", (64, 64)), 4, TILE, OVERLAP)  # warm up
    results = []
    for edge in sizes:
        image = Image.fromarray(np.random.default_rng(edge).integers(0, 256, (edge, edge, 3), dtype=np.uint8))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = upscale.upscale_tiled(model, image, 4, TILE, OVERLAP)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            out, peak = _cpu_working_peak(model, image)
        assert out.size == (4 * edge, 4 * edge)
        del out, image
        results.append((edge, int(peak)))
    return results


def _image() -> Image.Image:
    w, h = IMAGE_SIZE
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _direct_calls(resident: Callable[[str], object], image: Image.Image) -> dict[str, Callable[[], object]]:
    """Each capability's engine work, called directly on the server's resident tiny models."""
    from paletta_server.engines import background, caption, detect, prompt, segment, upscale

    def analyze() -> None:
        caption.caption(resident("blip-large"), image, 40)
        detect.detect(resident("detr-resnet-50"), image, 0.7)

    return {
        "upscale": lambda: upscale.upscale_tiled(resident("realesrgan-x4plus"), image, 4, TILE, OVERLAP),
        "remove_background": lambda: background.remove_background(resident("birefnet-general"), image),
        "segment": lambda: segment.segment(resident("clipseg"), image, "the sky", 0.4),
        "detect": lambda: detect.detect(resident("detr-resnet-50"), image, 0.7),
        "ground": lambda: detect.ground(resident("owlv2"), image, ["the dragon"], 0.1),
        "caption": lambda: caption.caption(resident("blip-large"), image, 40),
        "caption_deep": lambda: caption.caption(resident("blip2-opt-2.7b"), image, 120, deep=True),
        "analyze": analyze,
        "expand": lambda: prompt.expand(resident("qwen2.5-1.5b-instruct"), "knight in forest", 0, 160),
    }


async def _direct_vs_grpc(folder: Path, runs: int) -> dict[str, tuple[float, float]]:
    import io

    import grpc

    from paletta.v1 import background_pb2 as bg
    from paletta.v1 import background_service_pb2_grpc as bg_grpc
    from paletta.v1 import caption_pb2 as cap
    from paletta.v1 import caption_service_pb2_grpc as cap_grpc
    from paletta.v1 import detect_pb2 as det
    from paletta.v1 import detect_service_pb2_grpc as det_grpc
    from paletta.v1 import image_pb2
    from paletta.v1 import prompt_pb2 as prm
    from paletta.v1 import prompt_service_pb2_grpc as prm_grpc
    from paletta.v1 import segment_pb2 as seg
    from paletta.v1 import segment_service_pb2_grpc as seg_grpc
    from paletta.v1 import upscale_pb2 as up
    from paletta.v1 import upscale_service_pb2_grpc as up_grpc
    from paletta_server.config import load_config
    from paletta_server.server import PalettaServer
    from tests.bench import on_device
    from tests.helpers import collect, upload

    data = folder / "grpc-data"
    (data / "models").mkdir(parents=True, exist_ok=True)
    if not (data / "models" / "tiny").exists():
        (data / "models" / "tiny").symlink_to(folder.resolve(), target_is_directory=True)
    server = PalettaServer(load_config(data, env={}, profile="tiny", port=0))
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            buf = io.BytesIO()
            _image().save(buf, format="PNG")
            asset = (await upload(channel, buf.getvalue())).name
            ref = image_pb2.ImageRef(asset=asset)
            calls = {
                "upscale": lambda: up_grpc.UpscaleServiceStub(channel).Upscale(
                    up.UpscaleRequest(image=ref, tile=TILE, overlap=OVERLAP)),
                "remove_background": lambda: bg_grpc.BackgroundServiceStub(channel).RemoveBackground(
                    bg.RemoveBackgroundRequest(image=ref)),
                "segment": lambda: seg_grpc.SegmentServiceStub(channel).Segment(
                    seg.SegmentRequest(image=ref, text="the sky")),
                "detect": lambda: det_grpc.DetectServiceStub(channel).Detect(det.DetectRequest(image=ref)),
                "ground": lambda: det_grpc.DetectServiceStub(channel).Ground(
                    det.GroundRequest(image=ref, queries=["the dragon"])),
                "caption": lambda: cap_grpc.CaptionServiceStub(channel).Caption(cap.CaptionRequest(image=ref)),
                "caption_deep": lambda: cap_grpc.CaptionServiceStub(channel).Caption(
                    cap.CaptionRequest(image=ref, depth=cap.CAPTION_DEPTH_DEEP)),
                "analyze": lambda: cap_grpc.CaptionServiceStub(channel).Analyze(cap.AnalyzeRequest(image=ref)),
                "expand": lambda: prm_grpc.PromptServiceStub(channel).Expand(
                    prm.ExpandRequest(prompt="knight in forest")),
            }
            direct = _direct_calls(server.app.residency.ensure_resident, _image())
            results = {}
            for name, call in calls.items():
                await collect(call())  # warm up: loads the model(s) on the device thread
                await on_device(server, channel, direct[name])
                remote_t, direct_t = [], []
                for _ in range(runs):
                    start = time.perf_counter()
                    events = await collect(call())
                    remote_t.append(time.perf_counter() - start)
                    assert events[-1].finished.job.state == 3, events[-1].finished.job.error.message
                    direct_t.append(await on_device(server, channel, direct[name]))
                results[name] = (statistics.median(remote_t), statistics.median(direct_t))
            return results
    finally:
        await server.stop(0)


def direct_vs_grpc(folder: Path, runs: int = RUNS) -> dict[str, tuple[float, float]]:
    """{capability: (gRPC median s, direct median s)} on the tiny models: the whole call through a
    real aio server (stored input asset, events to finish) and the same engine work called directly
    on the server's resident models, on its device thread (``tests.bench.on_device``)."""
    return asyncio.run(_direct_vs_grpc(Path(folder), runs))


def report(folder: Path) -> None:
    folder = Path(folder) / "vision-models"
    folder.mkdir(parents=True, exist_ok=True)
    w, h = IMAGE_SIZE
    print(f"Capabilities on a {w}x{h} image, tiny models, median of {RUNS}: gRPC / direct  (target <= 1.10)")
    for name, (remote, direct) in direct_vs_grpc(folder).items():
        print(f"  {name:18s} direct {direct * 1000:9.1f} ms  gRPC {remote * 1000:9.1f} ms  {remote / direct:6.3f}",
              flush=True)
    # In a fresh process: RSS growth there is not hidden by memory the timings' models left free.
    print(f"Real-ESRGAN (tiny RRDBNet) 4x, tile {TILE}, overlap {OVERLAP}: peak working memory", flush=True)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        peaks = pool.apply(upscale_peak_memory, (folder,))
    for edge, peak in peaks:
        print(f"  {edge}x{edge} -> {4 * edge}x{4 * edge}: {peak / 2**20:8.1f} MiB", flush=True)


if __name__ == "__main__":
    import tempfile

    report(Path(tempfile.mkdtemp(prefix="paletta-bench-vision-")))
