"""Diffusion-family figures on the tiny models (figures, not timed tests).

Called by the benchmark command (``python -m tests.bench``), which calls ``report(folder)``;
or alone: ``python -m tests.bench.diffusion [--size 256 --steps 4 --runs 3]``.

Helpers, usable from any script or notebook (each starts its own tiny-profile server in a temp
data dir under ``folder`` and stops it; safe to call from inside a running event loop):

- ``direct_vs_grpc(folder, size=256, steps=4, runs=3) -> dict[str, tuple[float, float, float]]``:
  for edit, inpaint, outpaint, qwen_edit and control, the median seconds of the whole gRPC
  call (inline upload, queue, events, round trip, PNG stored) and of the same engine call made
  directly on the same resident pipeline, on the server's device thread (``on_device``), and
  their ratio (target <= 1.10).
- ``style_switch_loads(folder, jobs=20) -> int``: runs ``jobs`` Generate jobs alternating the five
  built-in styles and returns how many times the base model (flux-schnell) was loaded (target 1).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import io
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from paletta.v1 import control_pb2 as ctl  # noqa: E402
from paletta.v1 import control_service_pb2_grpc as ctl_grpc  # noqa: E402
from paletta.v1 import edit_pb2 as edit_pb  # noqa: E402
from paletta.v1 import edit_service_pb2_grpc as edit_grpc  # noqa: E402
from paletta.v1 import generate_pb2 as gen  # noqa: E402
from paletta.v1 import generate_service_pb2_grpc as gen_grpc  # noqa: E402
from paletta.v1 import image_pb2  # noqa: E402
from paletta.v1 import inpaint_pb2 as inp  # noqa: E402
from paletta.v1 import inpaint_service_pb2_grpc as inp_grpc  # noqa: E402
from paletta.v1 import qwen_edit_pb2 as qwen_pb  # noqa: E402
from paletta.v1 import qwen_edit_service_pb2_grpc as qwen_grpc  # noqa: E402
from tests.bench import NullSink, on_device  # noqa: E402

STYLES = ("realism", "koda", "tarot", "ghibsky", "anime")



def _picture(size: tuple[int, int]) -> Image.Image:
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.uint8)
    y = np.linspace(0, 255, h, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (h, 1)), np.tile(y[:, None], (1, w)), np.full((h, w), 70, np.uint8)], axis=-1)
    return Image.fromarray(rgb, "RGB")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _run_sync(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    """asyncio.run, or in a worker thread when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_fn())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(coro_fn())).result()


async def _with_server(folder: Path, body: Callable[[Any, Any], Awaitable[Any]]) -> Any:
    import grpc

    from paletta_server.config import load_config
    from paletta_server.server import PalettaServer

    data = Path(tempfile.mkdtemp(prefix="diffusion-", dir=folder))
    shared = Path(folder) / "tiny-models"
    shared.mkdir(parents=True, exist_ok=True)
    (data / "models").mkdir(parents=True, exist_ok=True)
    (data / "models" / "tiny").symlink_to(shared, target_is_directory=True)
    server = PalettaServer(load_config(data, env={}, profile="tiny", host="127.0.0.1", port=0))
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await body(server, channel)
    finally:
        await server.stop(0.5)


async def _consume(call) -> None:
    import grpc

    while (await call.read()) is not grpc.aio.EOF:
        pass


def _cases(size: int, steps: int) -> dict[str, tuple[Callable, Callable]]:
    """name → (gRPC call factory(channel), direct call factory(app) → zero-arg callable)."""
    from paletta_server.capabilities.inpaint import outpaint_canvas
    from paletta_server.engines import control, flux_edit, qwen

    image = _picture((size, size))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    narrow = _picture((size - 64, size))
    canvas, canvas_mask = outpaint_canvas(narrow, 0, 64, 0, 0)
    ref = image_pb2.ImageRef(inline=_png(image))
    common = dict(steps=steps, seed=1)

    def resident(app, key):
        return app.residency.ensure_resident(key)

    return {
        "edit": (
            lambda ch: edit_grpc.EditServiceStub(ch).Edit(edit_pb.EditRequest(image=ref, prompt="make it dusk",
                                                                              **common)),
            lambda app: (lambda: flux_edit.edit(resident(app, "flux-kontext"), NullSink(), image=image,
                                                prompt="make it dusk", guidance=2.5, preview_every=10**9,
                                                **common)),
        ),
        "inpaint": (
            lambda ch: inp_grpc.InpaintServiceStub(ch).Inpaint(inp.InpaintRequest(
                image=ref, mask=image_pb2.ImageRef(inline=_png(mask)), prompt="a door", **common)),
            lambda app: (lambda: flux_edit.fill(resident(app, "flux-fill"), NullSink(), image=image, mask=mask,
                                                prompt="a door", guidance=30.0, preview_every=10**9, **common)),
        ),
        "outpaint": (
            lambda ch: inp_grpc.InpaintServiceStub(ch).Outpaint(inp.OutpaintRequest(
                image=image_pb2.ImageRef(inline=_png(narrow)), prompt="more sky", right=64, **common)),
            lambda app: (lambda: flux_edit.fill(resident(app, "flux-fill"), NullSink(), image=canvas,
                                                mask=canvas_mask, prompt="more sky", guidance=30.0,
                                                preview_every=10**9, **common)),
        ),
        "qwen_edit": (
            lambda ch: qwen_grpc.QwenEditServiceStub(ch).Edit(qwen_pb.QwenEditServiceEditRequest(
                image=ref, prompt="make it snowy", **common)),
            lambda app: (lambda: qwen.edit(resident(app, "qwen-image-edit"), NullSink(), image=image,
                                           prompt="make it snowy", negative_prompt="", guidance=4.0,
                                           preview_every=10**9, **common)),
        ),
        "control": (
            lambda ch: ctl_grpc.ControlServiceStub(ch).Control(ctl.ControlRequest(
                control_image=ref, prompt="a robot", control_type=ctl.CONTROL_TYPE_DEPTH, **common)),
            lambda app: (lambda: control.control(resident(app, "flux-controlnet-union"), NullSink(),
                                                 control_image=image, control_type=ctl.CONTROL_TYPE_DEPTH,
                                                 control_scale=0.7, prompt="a robot", width=size, height=size,
                                                 guidance=3.5, preview_every=10**9, **common)),
        ),
    }


def direct_vs_grpc(folder: Path, size: int = 256, steps: int = 4, runs: int = 3
                   ) -> dict[str, tuple[float, float, float]]:
    """{capability: (gRPC median s, direct median s, ratio)} on the tiny models (see module docstring)."""
    cases = _cases(size, steps)

    async def body(server, channel):
        results = {}
        for name, (remote, direct) in cases.items():
            await _consume(remote(channel))  # load + warm
            call = direct(server.app)
            await on_device(server, channel, call)  # warm
            remote_t, direct_t = [], []
            for _ in range(runs):
                start = time.perf_counter()
                await _consume(remote(channel))
                remote_t.append(time.perf_counter() - start)
                direct_t.append(await on_device(server, channel, call))
            g, d = statistics.median(remote_t), statistics.median(direct_t)
            results[name] = (g, d, g / d)
        return results

    return _run_sync(lambda: _with_server(Path(folder), body))


def style_switch_loads(folder: Path | None = None, jobs: int = 20) -> int:
    """Base-model (flux-schnell) loads over ``jobs`` Generate jobs alternating the five styles."""
    folder = Path(folder or tempfile.mkdtemp(prefix="paletta-bench-styles-"))

    async def body(server, channel):
        stub = gen_grpc.GenerateServiceStub(channel)
        for i in range(jobs):
            style = image_pb2.StyleSelection(name=STYLES[i % len(STYLES)], weight=1.0)
            await _consume(stub.Generate(gen.GenerateRequest(prompt="a lighthouse", width=64, height=64, steps=2,
                                                             seed=i, styles=[style])))
        return server.app.residency.load_counts["flux-schnell"]

    return _run_sync(lambda: _with_server(folder, body))


def report(folder: Path, size: int = 256, steps: int = 4, runs: int = 3) -> None:
    folder = Path(folder) / "diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"Diffusion capabilities {size}x{size}, {steps} steps, tiny models, median of {runs}: "
          "gRPC / direct  (target <= 1.10)", flush=True)
    for name, (g, d, ratio) in direct_vs_grpc(folder, size, steps, runs).items():
        print(f"  {name:10s} direct {d * 1000:8.1f} ms  gRPC {g * 1000:8.1f} ms  {ratio:6.3f}", flush=True)
    loads = style_switch_loads(folder)
    print(f"Base-model loads over 20 Generate jobs alternating 5 styles: {loads}  (target 1)", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    report(Path(tempfile.mkdtemp(prefix="paletta-bench-diffusion-")), args.size, args.steps, args.runs)
