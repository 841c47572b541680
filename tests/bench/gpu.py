"""Full-size FLUX.1 benchmark on a GPU: Paletta's own server, loaders and SDK on random weights of the
real sizes (same FLOPs and memory as the released checkpoints, nothing to download).

    python -m tests.bench.gpu [--out bench-out/gpu] [--budget-s 360]     # on a CUDA machine
    python -m tests.bench.gpu --size tiny --steps 2 --runs 2             # same code path, CPU, tiny models

What it does, writing ``<out>/results.json`` after every figure (a cut-off run still returns what it had):

1. Builds the tiny FLUX folders of the project (schnell, Kontext, Fill; engines/tiny), then, at full
   size, replaces their transformer, T5-XXL, CLIP-L and VAE with full-size random-weight components
   built on the GPU in bf16 and saved into a tmpfs (see /work/shared/notes/gpu.md); the tiny
   character tokenizers stay. One transformer (with guidance embeddings) serves schnell and Kontext.
2. Per profile (``fast`` = NF4 on CUDA, ``quality`` = bf16) it starts the real server in-process
   with ``PALETTA_MODEL_<KEY>`` pointing at those folders and measures, for Generate (schnell, 4 steps),
   Kontext Edit and, when time allows, Fill inpaint: gRPC time / direct engine call on the same
   resident pipeline (median of ``--runs``), s/step, progress latency, the job's time line from its
   events (submitted → started → first / last step → output → finished → client), measured resident
   bytes (GetStatus) and peak allocated memory; the first image after server start (load included);
   for Generate and Edit the PNG encode (Pillow as the server does today, and storage/png.py), sha256
   and atomic write of the real output. Then a second ``fast`` start on the same data dir gives the
   first-image time with the NF4 cache warm (engines/nf4_cache.py).
   ``turbo`` (float8 on compute capability 8.9+, else bf16; the transformer's repeated blocks compiled)
   runs Generate and Edit the same way: its first image includes the compile with an empty cache;
   ``turbo_restart`` starts again on the same data dir (dynamo reset, as in a new process) and gives the
   first image with the compile cache warm. ``compile`` records inductor's cache hits and misses.
   ``--only turbo`` runs these two alone.

3. ``memory`` (``--memory-budget 16GiB``, last, or alone with ``--only memory``): a ``fast`` server
   capped at that budget (the residency plan and ``torch.cuda.set_per_process_memory_fraction``, so an
   80+ GB GPU fails where a 16 GB card would) runs one job per capability at ``--res`` (1024²):
   Generate, Kontext Edit, Fill inpaint, ControlNet (full-size Union-Pro, NF4), identity (full-size
   PuLID and EVA02-L; skipped, saying why, where InsightFace, facexlib or onnx is missing) and, when the
   time and the tmpfs allow, Qwen-Image-Edit (20 B MMDiT + Qwen2.5-VL-7B, built after the FLUX weights are
   removed). Each writes pass/fail (with the error reason), peak allocated, s/step, whether it was
   offloaded and what was evicted into results.json ``memory.jobs`` and summary.md as it goes.

Stages run in order of importance and are skipped when their estimate no longer fits ``--budget-s``.
``--only`` names the stages to run (fast, quality, turbo, memory; e.g. ``--only quality memory turbo``),
so one device call can take several without building the full-size weights again; they run as fast,
quality, memory, turbo. Before anything is built, ``preflight`` constructs every full-size component on
the meta device. Direct calls run on the server's device thread between jobs (tests.bench.on_device),
carried by a small job of the same model. SIGINT (gpu_device.sh's deadline) ends the run with exit
status 3, results.json and summary.md written and the work folder removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import io
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from paletta_server.engines.common import free_device_memory  # noqa: E402
from tests.bench import on_device  # noqa: E402

KEYS = ("flux-schnell", "flux-kontext", "flux-fill")
PROMPT = "a lighthouse on a cliff at dusk, storm clouds, photograph"
EDIT_PROMPT = "make it a snowy winter night"
FILL_PROMPT = "a wooden door"
FULL = {  # FLUX.1 component shapes (shared/notes/gpu.md)
    "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "t5": dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
               relative_attention_max_distance=128, layer_norm_epsilon=1e-6, tie_word_embeddings=False),
    # bos / eos / pad ids match the tiny CLIP tokenizer that stays in the folders
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu",
                 bos_token_id=0, eos_token_id=1, pad_token_id=1),
    "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611, sample_size=1024),
    # Shakker-Labs FLUX.1-dev-ControlNet-Union-Pro (InstantX Union layout): 5 double + 10 single blocks
    "controlnet": dict(patch_size=1, in_channels=64, num_layers=5, num_single_layers=10, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                       guidance_embeds=True, axes_dims_rope=(16, 56, 56), num_mode=10),
    # Qwen-Image(-Edit) MMDiT, 20.4 B: diffusers' QwenImageTransformer2DModel defaults
    "qwen_transformer": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                             num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
    # Qwen2.5-VL-7B-Instruct (token ids stay those of the tiny tokenizer, which the vocabulary covers)
    "qwen_text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                      num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000),
    "qwen_vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                        fullatt_block_indexes=[7, 15, 23, 31]),
}
MEMORY_KINDS = ("generate", "edit", "inpaint", "control", "identity", "qwen_edit")
CARRIER_EDGE = 64  # the small job of the measured model that carries a direct call onto the device thread
log = logging.getLogger("paletta.bench.gpu")


# -- results ---------------------------------------------------------------------------------------
class Results:
    """Nested dict written to ``<out>/results.json`` (atomically) after every ``put``."""

    def __init__(self, out: Path, started: float):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = started
        self.data: dict[str, Any] = {"meta": {}, "preflight": {}, "build": {}, "profiles": {}, "skipped": [],
                                     "errors": [], "elapsed_s": 0.0}

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def put(self, path: str, value: Any) -> None:
        node = self.data
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _plain(value)
        self.flush()

    def append(self, key: str, value: Any) -> None:
        self.data[key].append(_plain(value))
        self.flush()

    def flush(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=False))
        tmp.replace(self.out / "results.json")

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float):
        return round(value, 6)
    return value


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


# -- models ----------------------------------------------------------------------------------------
def work_dir(size: str, needed_bytes: int) -> Path:
    """A tmpfs folder when one has room (weights load from memory), else a temp folder on disk."""
    shm = Path("/dev/shm")
    if size == "full" and shm.is_dir() and shutil.disk_usage(shm).free >= needed_bytes:
        return Path(tempfile.mkdtemp(prefix="paletta-gpu-bench-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="paletta-gpu-bench-"))


def build_tiny_folders(models: Path) -> dict[str, Path]:
    """The project's tiny FLUX folders, built by the registry's own tiny builders."""
    from paletta_server.engines.common import import_object
    from paletta_server.models.registry import SPECS

    specs = {spec.key: spec for spec in SPECS}
    folders = {}
    for key in KEYS:
        folder = models / "tiny" / key
        if not (folder / ".complete").exists():
            folder.mkdir(parents=True, exist_ok=True)
            import_object(specs[key].tiny_builder)(folder)
            (folder / ".complete").touch()
        folders[key] = folder
    return folders


def full_qwen_text_encoder(tiny_config: Path | None) -> Any:
    """Qwen2.5-VL-7B from the tiny build's config (its special token ids) with the real widths."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig.from_pretrained(tiny_config)
    for name, value in FULL["qwen_text"].items():
        setattr(config.text_config, name, value)
    if getattr(config.text_config, "layer_types", None) is not None:  # one entry per layer, as the tiny had
        config.text_config.layer_types = ["full_attention"] * config.text_config.num_hidden_layers
    rope = dict(getattr(config.text_config, "rope_parameters", None) or {})
    rope.update(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24])
    config.text_config.rope_parameters = rope
    for name, value in FULL["qwen_vision"].items():
        setattr(config.vision_config, name, value)
    return Qwen2_5_VLForConditionalGeneration(config)


def construct(name: str, fill: bool = False, tiny_config: Path | None = None) -> Any:
    """One full-size component with random weights, on the current default device and dtype."""
    if name == "transformer":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel(**dict(FULL["transformer"],
                                             **({"in_channels": 384, "out_channels": 64} if fill else {})))
    if name == "text_encoder_2":
        from transformers import T5Config, T5EncoderModel

        return T5EncoderModel(T5Config(**FULL["t5"]))
    if name == "text_encoder":
        from transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig(**FULL["clip"]))
    if name == "controlnet":
        from diffusers import FluxControlNetModel

        return FluxControlNetModel(**FULL["controlnet"])
    if name == "qwen_transformer":
        from diffusers import QwenImageTransformer2DModel

        return QwenImageTransformer2DModel(**FULL["qwen_transformer"])
    if name == "qwen_text_encoder":
        return full_qwen_text_encoder(tiny_config)
    if name == "qwen_vae":
        from diffusers import AutoencoderKLQwenImage

        return AutoencoderKLQwenImage()
    assert name == "vae", name
    from diffusers import AutoencoderKL

    return AutoencoderKL(**FULL["vae"])


# The full-size components a kind builds beyond the FLUX ones (which every stage needs).
FULL_BUILDERS = {"control": ("controlnet",), "qwen_edit": ("qwen_transformer", "qwen_vae", "qwen_text_encoder")}
FLUX_COMPONENTS = ("transformer", "text_encoder_2", "text_encoder", "vae")


def preflight(res: Results, names: tuple[str, ...], tiny_config: Path | None = None) -> bool:
    """Construct full-size components on the meta device (no memory, about a second each): a config
    these library versions refuse is known before device time is spent building it. False if any fails."""
    import torch

    ok = True
    for name in names:
        start = time.perf_counter()
        try:
            with torch.device("meta"):
                model = construct(name, tiny_config=tiny_config)
            res.put(f"preflight.{name}", {"params": sum(p.numel() for p in model.parameters()),
                                          "seconds": time.perf_counter() - start})
            del model
        except Exception as exc:
            ok = False
            res.put(f"preflight.{name}", {"error": f"{type(exc).__name__}: {exc}"[:1000]})
            res.say(f"preflight: the full-size {name} does not build: {type(exc).__name__}: {str(exc)[:300]}")
    return ok


def build_full_component(name: str, dest: Path, fill: bool = False,
                         tiny_config: Path | None = None) -> dict[str, float]:
    """Construct one full-size component on the GPU in bf16 and save it; returns parameters and seconds."""
    import torch

    start = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    torch.manual_seed(0)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = construct(name, fill, tiny_config)
        params = sum(p.numel() for p in model.parameters())
        built = time.perf_counter() - start
        model.save_pretrained(dest)
    finally:
        torch.set_default_dtype(previous)
    del model
    free_device_memory()
    return {"params": params, "construct_s": built, "total_s": time.perf_counter() - start}


def room_for_fill(res: Results, work: Path, size: str) -> bool:
    """A second full-size transformer (24 GB) must fit in the work folder and leave memory to load it."""
    if size != "full":
        return True
    free = shutil.disk_usage(work).free
    try:
        available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = 0
    if free >= 40 * 1024**3 and available >= 60 * 1024**3:
        return True
    res.append("skipped", {"stage": "fill", "reason": f"work folder free {free / 1e9:.0f} GB, memory available "
                                                      f"{available / 1e9:.0f} GB"})
    return False


def swap_in(folder: Path, component: str, full: Path) -> None:
    """Replace a tiny folder's component with a link to the full-size one (tokenizers stay tiny)."""
    target = folder / component
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    target.symlink_to(full, target_is_directory=True)


def build_models(res: Results, work: Path, size: str) -> dict[str, Path]:
    start = time.perf_counter()
    folders = build_tiny_folders(work / "models")
    res.put("build.tiny_folders_s", time.perf_counter() - start)
    if size == "full":
        full = work / "full"
        for name in ("transformer", "text_encoder_2", "text_encoder", "vae"):
            res.put(f"build.{name}", build_full_component(name, full / name))
            res.say(f"built full-size {name}: {res.data['build'][name]['params'] / 1e9:.2f} B parameters")
            for key in KEYS:
                if not (name == "transformer" and key == "flux-fill"):
                    swap_in(folders[key], name, full / name)
    res.put("build.total_s", time.perf_counter() - start)
    return folders


def build_fill_transformer(res: Results, work: Path, folders: dict[str, Path]) -> None:
    dest = work / "full" / "transformer-fill"
    if not dest.exists():
        res.put("build.transformer_fill", build_full_component("transformer", dest, fill=True))
    swap_in(folders["flux-fill"], "transformer", dest)


# -- measuring one server --------------------------------------------------------------------------
class TimingSink:
    """A ProgressSink for direct engine calls that keeps the time of every step."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.previews = 0

    def progress(self, step, total, stage):
        self.steps.append(time.perf_counter())

    def preview(self, image, step):
        from paletta_server.jobs.runner import preview_jpeg

        preview_jpeg(image)  # the work a job's preview does on the device thread
        self.previews += 1

    def check_cancelled(self):
        pass


class GcPauses:
    """While entered: the time the garbage collector runs (it holds the GIL, so every thread waits),
    and how often, by generation. A job makes garbage the direct call does not (events, messages)."""

    def __init__(self) -> None:
        self.ms = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._began: float | None = None

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began is not None:
            self.ms[info["generation"]] += (time.perf_counter() - self._began) * 1000
            self.count[info["generation"]] += 1
            self._began = None

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)
        self._began = None

    def figures(self) -> dict[str, list]:
        return {"ms": [round(ms, 3) for ms in self.ms], "collections": list(self.count)}


def _cuda() -> Any | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda if torch.cuda.is_available() else None


def _peak_memory() -> dict[str, int]:
    cuda = _cuda()
    if cuda is not None:
        return {"peak_allocated_bytes": cuda.max_memory_allocated()}
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _synchronize() -> None:
    """Wait for the GPU (a timed interval ends when its work is done, not when it was queued)."""
    cuda = _cuda()
    if cuda is not None:
        cuda.synchronize()


def _reset_peak() -> None:
    cuda = _cuda()
    if cuda is not None:
        cuda.synchronize()
        cuda.reset_peak_memory_stats()


class Server:
    """An in-process Paletta server for one profile, and an SDK client on it."""

    def __init__(self, data: Path, profile: str, **overrides: Any):
        self.data, self.profile, self.overrides = data, profile, overrides

    async def __aenter__(self) -> Server:
        import paletta
        from paletta_server.config import load_config
        from paletta_server.server import PalettaServer

        self.t0 = time.perf_counter()
        self.server = PalettaServer(load_config(self.data, env={}, profile=self.profile, host="127.0.0.1", port=0,
                                                **self.overrides))
        port = await self.server.start()
        self.started_s = time.perf_counter() - self.t0
        self.client = paletta.AsyncClient(f"127.0.0.1:{port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
        await self.server.stop(0.5)
        await asyncio.to_thread(self.server.app.residency.unload)
        del self.server
        release_device_memory()

    @property
    def app(self) -> Any:
        return self.server.app


def release_device_memory() -> None:
    """What a stopped server leaves on the GPU, freed for the next stage (under the memory stage's cap
    every byte counts): compiled code holding its modules, cuBLAS workspaces of the dead device
    thread, cached allocator blocks."""
    if _cuda() is not None:
        import torch

        torch._dynamo.reset()
        torch._C._cuda_clearCublasWorkspaces()
    free_device_memory()


def device_memory() -> dict[str, int]:
    cuda = _cuda()
    if cuda is None:
        return {}
    return {"allocated_bytes": cuda.memory_allocated(), "reserved_bytes": cuda.memory_reserved()}


async def timed_job(start_job: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    """Run one job through the SDK; the client-side seconds and every event with its receipt time."""
    wall0, t0 = time.time(), time.perf_counter()
    job = await start_job()
    events = []
    async for event in job:
        events.append((event, time.time()))
    seconds = time.perf_counter() - t0
    final = events[-1][0] if events else None
    if final is None or final.WhichOneof("kind") != "finished" or final.finished.job.HasField("error"):
        raise RuntimeError(f"job did not succeed: {final}")
    return {"seconds": seconds, "wall0": wall0, "t0": t0, "events": events}


def timeline(job: dict[str, Any]) -> dict[str, float]:
    """Milliseconds between the job's events (server timestamps) and at the client."""
    stamps: dict[str, float] = {}
    steps = []
    for event, received in job["events"]:
        kind = event.WhichOneof("kind")
        at = event.time.ToNanoseconds() / 1e9
        if kind == "progress" and event.progress.stage == "denoising":
            steps.append(at)
        elif kind in ("started", "output", "finished") and kind not in stamps:
            stamps[kind] = at
            if kind == "finished":
                stamps["client_end"] = received
    if not steps or not {"started", "output", "finished"} <= stamps.keys():
        return {}
    return {
        "submit_to_started": (stamps["started"] - job["wall0"]) * 1000,
        "started_to_first_step": (steps[0] - stamps["started"]) * 1000,
        "first_to_last_step": (steps[-1] - steps[0]) * 1000,
        "last_step_to_output": (stamps["output"] - steps[-1]) * 1000,
        "output_to_finished": (stamps["finished"] - stamps["output"]) * 1000,
        "finished_to_client": (stamps["client_end"] - stamps["finished"]) * 1000,
        "total": (stamps["client_end"] - job["wall0"]) * 1000,
        "steps": len(steps),
    }


def _progress_latencies(jobs: list[dict[str, Any]]) -> list[float]:
    return [(received - event.time.ToNanoseconds() / 1e9) * 1000 for job in jobs for event, received in job["events"]
            if event.WhichOneof("kind") == "progress" and event.progress.stage == "denoising"]


async def png_figures(server: Server, asset_name: str, runs: int = 5) -> dict[str, Any]:
    """Encode the real output as the server does today (Pillow, level 1, parameters chunk) and with
    storage/png.py; sha256 and an atomic fsynced write like storage/assets.py."""
    from PIL.PngImagePlugin import PngInfo

    stored = await server.client.download(asset_name)
    image = Image.open(io.BytesIO(stored))
    image.load()
    text = image.text.get("parameters", "{}")

    def pillow() -> bytes:
        info = PngInfo()
        info.add_text("parameters", text)
        buf = io.BytesIO()
        image.save(buf, format="PNG", pnginfo=info, compress_level=1)
        return buf.getvalue()

    def timed(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return _median(times) * 1000

    def write() -> None:
        fd, tmp = tempfile.mkstemp(dir=server.data, prefix=".bench-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(stored)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, server.data / ".bench-written")

    data = pillow()
    figures: dict[str, Any] = {
        "mode": image.mode, "size": list(image.size), "stored_bytes": len(stored),
        "raw_bytes": image.width * image.height * len(image.getbands()),
        "pillow_level1_ms": timed(pillow), "pillow_level1_bytes": len(data),
        "sha256_ms": timed(lambda: hashlib.sha256(data).hexdigest()),
        "write_fsync_ms": timed(write),
    }
    try:
        from paletta_server.storage.png import encode_png, isal_zlib

        fast = encode_png(image, {"parameters": text})
        figures.update(encode_png_ms=timed(lambda: encode_png(image, {"parameters": text})), encode_png_bytes=len(fast),
                       encode_png_backend="isal" if isal_zlib is not None else "pillow")
    except ImportError:
        pass
    return figures


async def measure(res: Results, prefix: str, server: Server, kind: str, args: argparse.Namespace,
                  warm: bool = False) -> None:
    """gRPC vs direct for one capability on a running server; writes ``<prefix>.*``."""
    from paletta_server.capabilities import diffusion_io
    from paletta_server.engines import flux, flux_edit

    size, runs = args.res, args.runs
    steps = args.steps if kind == "generate" else args.edit_steps
    client = server.client
    infer = (size, size) if kind == "generate" else diffusion_io.inference_size(size, size,
                                                                                server.app.profile.max_inference_edge)
    picture = Image.fromarray(photo_like(size), "RGB")
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    little = CARRIER_EDGE
    if kind == "generate":
        key = "flux-schnell"

        def start_job():
            return client.generate(PROMPT, width=size, height=size, steps=steps, seed=1)

        def start_carrier():
            return client.generate("carrier", width=little, height=little, steps=1, seed=0)

        def direct(pipe, sink, preview_every=10**9):
            return flux.text_to_image(pipe, sink, prompt=PROMPT, width=size, height=size, steps=steps, seed=1,
                                      guidance=0.0, preview_every=preview_every)
    elif kind == "edit":
        key = "flux-kontext"
        image_asset = (await client.upload(picture)).name
        small = diffusion_io.fit(picture, infer)

        def start_job():
            return client.edit(image_asset, EDIT_PROMPT, steps=steps, seed=1)

        little_asset = (await client.upload(picture.resize((little, little)))).name

        def start_carrier():
            return client.edit(little_asset, "carrier", steps=1, seed=0)

        def direct(pipe, sink, preview_every=10**9):
            return flux_edit.edit(pipe, sink, image=small, prompt=EDIT_PROMPT, steps=steps, seed=1, guidance=2.5,
                                  preview_every=preview_every)
    else:
        key = "flux-fill"
        image_asset = (await client.upload(picture)).name
        mask_asset = (await client.upload(mask)).name
        small, small_mask = diffusion_io.fit(picture, infer), diffusion_io.fit(mask, infer)

        def start_job():
            return client.inpaint(image_asset, mask_asset, FILL_PROMPT, steps=steps, seed=1)

        little_asset = (await client.upload(picture.resize((little, little)))).name
        little_mask = (await client.upload(mask.resize((little, little)))).name

        def start_carrier():
            return client.inpaint(little_asset, little_mask, "carrier", steps=1, seed=0)

        def direct(pipe, sink, preview_every=10**9):
            return flux_edit.fill(pipe, sink, image=small, mask=small_mask, prompt=FILL_PROMPT, steps=steps, seed=1,
                                  guidance=30.0, preview_every=preview_every)

    res.put(f"{prefix}.setup", {"key": key, "size": [size, size], "inference_size": list(infer), "steps": steps,
                                "runs": runs})
    if not warm:  # load + first job
        start = time.perf_counter()
        await timed_job(start_job)
        res.put(f"{prefix}.load_and_first_job_s", time.perf_counter() - start)
    pipe = await asyncio.to_thread(server.app.residency.ensure_resident, key)

    async def on_device_thread(sink: TimingSink, preview_every: int = 10**9,
                               pauses: GcPauses | None = None) -> tuple[float, float]:
        """The direct call on the server's device thread (tests.bench.on_device), between jobs, the
        carrier a small job of the same model; (start, end) on the perf_counter clock, the GPU done."""
        marks: list[float] = []

        def call() -> None:
            with pauses or contextlib.nullcontext():
                marks.append(time.perf_counter())
                direct(pipe, sink, preview_every)
                _synchronize()
                marks.append(time.perf_counter())

        await on_device(server, None, call, carrier=lambda: timed_job(start_carrier))
        return marks[0], marks[1]

    grpc_jobs, direct_times, direct_steps = [], [], []
    gc_grpc, gc_direct = GcPauses(), GcPauses()
    for _ in range(runs):
        with gc_grpc:
            grpc_jobs.append(await timed_job(start_job))
        sink = TimingSink()
        start, end = await on_device_thread(sink, pauses=gc_direct)
        direct_times.append(end - start)
        if sink.steps:
            direct_steps.append({"start_to_first_step": (sink.steps[0] - start) * 1000,
                                 "first_to_last_step": (sink.steps[-1] - sink.steps[0]) * 1000,
                                 "last_step_to_return": (end - sink.steps[-1]) * 1000})
    previews_every = server.app.config.preview_every  # the same call with the previews a job makes
    with_previews, previews_sent = [], []
    for _ in range(runs):
        sink = TimingSink()
        start, end = await on_device_thread(sink, previews_every)
        with_previews.append(end - start)
        previews_sent.append(sink.previews)
    pipe = None  # the residency manager may free it
    grpc_s = [j["seconds"] for j in grpc_jobs]
    g, d = _median(grpc_s), _median(direct_times)
    lines = [t for t in (timeline(j) for j in grpc_jobs) if t]
    breakdown = {name: _median([t[name] for t in lines]) for name in (lines[0] if lines else {})}
    direct_breakdown = {name: _median([t[name] for t in direct_steps]) for name in (direct_steps[0] if direct_steps
                                                                                    else {})}
    per_step = steps - 1 if steps > 1 else 1
    latencies = sorted(_progress_latencies(grpc_jobs))
    status = await client.status()
    figures = {
        "grpc_s": grpc_s, "direct_s": direct_times, "grpc_median_s": g, "direct_median_s": d,
        "ratio": g / d if d else 0.0, "overhead_ms": (g - d) * 1000,
        "direct_with_previews_s": with_previews, "previews_ms": (_median(with_previews) - d) * 1000,
        # against the direct call that makes the job's previews too: what the job adds beyond them
        "ratio_with_previews": g / _median(with_previews) if with_previews else 0.0,
        # previews made (of those due: steps below the last, every preview_every): by the direct call
        # with previews and by each gRPC job; on CUDA one still being copied at the last step is dropped
        "previews": {"due": len(range(previews_every, steps, previews_every)), "direct": previews_sent,
                     "grpc": [sum(e.WhichOneof("kind") == "preview" for e, _ in j["events"]) for j in grpc_jobs]},
        # the garbage collector's pauses (all threads) over all runs, by generation
        "gc": {"grpc": gc_grpc.figures(), "direct": gc_direct.figures()},
        "s_per_step_grpc": breakdown.get("first_to_last_step", 0.0) / 1000 / per_step,
        "s_per_step_direct": direct_breakdown.get("first_to_last_step", 0.0) / 1000 / per_step,
        "progress_latency_ms": {"p50": latencies[len(latencies) // 2] if latencies else 0.0,
                                "max": latencies[-1] if latencies else 0.0, "n": len(latencies)},
        "breakdown_ms": breakdown, "direct_breakdown_ms": direct_breakdown,
        "resident_bytes": {m.key: m.bytes for m in status.loaded_models},
        "memory_used_bytes": status.memory_used_bytes, "device": status.device,
        "quantization": status.quantization, **_peak_memory(),
    }
    for name, value in figures.items():
        res.put(f"{prefix}.{name}", value)
    res.say(f"{prefix}: gRPC {g:.3f} s / direct {d:.3f} s = {figures['ratio']:.3f}; "
            f"{figures['s_per_step_direct']:.3f} s/step; overhead {figures['overhead_ms']:.0f} ms "
            f"(previews in the direct call: {figures['previews_ms']:+.0f} ms); "
            f"resident {sum(figures['resident_bytes'].values()) / 1e9:.1f} GB")
    if kind in ("generate", "edit"):
        outputs = [e.output.asset.name for e, _ in grpc_jobs[-1]["events"] if e.WhichOneof("kind") == "output"]
        png = await png_figures(server, outputs[0])
        res.put(f"{prefix}.png", png)
        res.say(f"{prefix}: PNG of the real output: Pillow {png['pillow_level1_ms']:.1f} ms "
                f"({png['pillow_level1_bytes'] / 1e6:.2f} MB), encode_png {png.get('encode_png_ms', 0):.1f} ms, "
                f"sha256 {png['sha256_ms']:.1f} ms, write+fsync {png['write_fsync_ms']:.1f} ms")


def photo_like(size: int) -> np.ndarray:
    from tests.bench.png import photo_like_image

    return photo_like_image(size)


async def run_profile_stage(res: Results, profile: str, data: Path, kinds: list[str], args: argparse.Namespace,
                            label: str, first_image: bool = True) -> None:
    from paletta_server.engines import nf4_cache

    cache_before = dict(nf4_cache.stats)
    compiled_before = _compile_counts(reset=profile == "turbo")
    _reset_peak()
    async with Server(data, profile) as server:
        prefix = f"profiles.{label}"
        res.put(f"{prefix}.server_start_s", server.started_s)
        if first_image:
            await _first_image(res, prefix, server, args, label, cache_before)
            if profile == "turbo":
                res.put(f"{prefix}.compile_first_image", _compile_delta(compiled_before))
        for kind in kinds:
            if not fits(res, args, f"{label}.{kind}", ESTIMATES[args.size][kind]):
                continue
            await stage(res, f"{label}.{kind}", lambda kind=kind: _measure_alone(
                res, f"{prefix}.{kind}", server, kind, args, warm=first_image and kind == "generate"))
        if profile == "turbo":
            res.put(f"{prefix}.compile", _compile_delta(compiled_before))
            res.say(f"{label}: compile cache {res.data['profiles'][label]['compile']}")


COMPILE_COUNTERS = ("fxgraph_cache_hit", "fxgraph_cache_miss")


def _compile_counts(reset: bool) -> dict[str, int]:
    """Inductor's FX-graph cache counters now; with ``reset``, dynamo forgets compiled code first, as a
    new process would (the on-disk cache in the data dir stays)."""
    try:
        import torch
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    if reset:
        torch._dynamo.reset()
    return {name: counters["inductor"][name] for name in COMPILE_COUNTERS}


def _compile_delta(before: dict[str, int]) -> dict[str, int]:
    now = _compile_counts(reset=False)
    return {name: now.get(name, 0) - before.get(name, 0) for name in COMPILE_COUNTERS}


async def _first_image(res: Results, prefix: str, server: Server, args: argparse.Namespace, label: str,
                       cache_before: dict[str, int]) -> None:
    from paletta_server.engines import nf4_cache

    job = await timed_job(lambda: server.client.generate(PROMPT, width=args.res, height=args.res,
                                                         steps=args.steps, seed=1))
    out_at = next(received for event, received in job["events"] if event.WhichOneof("kind") == "output")
    # from constructing the server to the first output event arriving at the client
    first_image_s = (job["t0"] - server.t0) + (out_at - job["wall0"])
    res.put(f"{prefix}.first_image_s", first_image_s)
    res.put(f"{prefix}.first_job_s", job["seconds"])
    res.put(f"{prefix}.nf4_cache", {k: v - cache_before.get(k, 0) for k, v in nf4_cache.stats.items()})
    res.put(f"{prefix}.load_log", list(LOAD_LOG))
    LOAD_LOG.clear()
    res.say(f"{label}: server up in {server.started_s:.2f} s, first image {first_image_s:.2f} s after start "
            f"(load included); nf4 cache {res.data['profiles'][label]['nf4_cache']}")


async def _measure_alone(res: Results, prefix: str, server: Server, kind: str, args: argparse.Namespace,
                         warm: bool) -> None:
    """``warm``: the model is loaded and has run once (the first image); otherwise each model is
    measured alone on the device: the others are unloaded and the peak counter reset first."""
    if not warm:
        await server.client.unload_models()
        _reset_peak()
    await measure(res, prefix, server, kind, args, warm=warm)


# -- the memory cap: every capability on an emulated 16 GB card ---------------------------------------
# What each memory-stage kind needs beyond the FLUX folders: registry keys (tiny folders, some swapped
# for full-size weights) and the Python packages their loaders and tiny builders import.
MEMORY_NEEDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "control": (("flux-dev", "flux-controlnet-union"), ()),
    "identity": (("flux-dev", "pulid-flux", "antelopev2", "eva02-clip-l-336", "facexlib-parsing"),
                 ("insightface", "facexlib", "onnx", "timm")),
    "qwen_edit": (("qwen-image-edit",), ()),
}
# Hyper-FLUX.1-dev-8steps-lora.safetensors is 1.39 GB: about rank 64 on every linear layer of the
# transformer's blocks, stored in fp32; the full-size stand-in has that layout and size.
HYPER_LORA_RANK = 64


def missing_packages(kind: str) -> list[str]:
    import importlib.util

    return [name for name in MEMORY_NEEDS.get(kind, ((), ()))[1] if importlib.util.find_spec(name) is None]


def build_memory_folders(res: Results, work: Path, size: str, kinds: list[str], profile: str) -> dict[str, Path]:
    """Tiny folders of what ``kinds`` need (the ControlNet and its FLUX.1-dev base, the identity models,
    Qwen-Image-Edit; the acceleration LoRA under ``hyper``); at full size the dev base links the full
    FLUX components (one transformer with guidance serves it)."""
    from paletta_server.engines.common import import_object
    from paletta_server.models.registry import SPECS

    specs = {spec.key: spec for spec in SPECS}
    start = time.perf_counter()
    keys = sorted({key for kind in kinds for key in MEMORY_NEEDS.get(kind, ((), ()))[0]}
                  | ({"hyper-sd"} if profile == "hyper" else set()))
    extra = {}
    for key in keys:
        folder = work / "models" / "tiny" / key
        if not (folder / ".complete").exists():
            folder.mkdir(parents=True, exist_ok=True)
            import_object(specs[key].tiny_builder)(folder)
            (folder / ".complete").touch()
        extra[key] = folder
    if size == "full" and "flux-dev" in extra:
        full = work / "full"
        for name in ("transformer", "text_encoder_2", "text_encoder", "vae"):
            swap_in(extra["flux-dev"], name, full / name)
    res.put("build.memory_tiny_folders_s", time.perf_counter() - start)
    res.put("build.memory_folders", sorted(extra))
    return extra


def build_full_controlnet(res: Results, work: Path, folder: Path) -> None:
    dest = work / "full" / "controlnet"
    if not dest.exists():
        res.put("build.controlnet", build_full_component("controlnet", dest))
        res.say(f"built full-size ControlNet Union-Pro: {res.data['build']['controlnet']['params'] / 1e9:.2f} B")
    shutil.rmtree(folder)
    folder.symlink_to(dest, target_is_directory=True)


def build_full_identity(res: Results, work: Path, extra: dict[str, Path]) -> None:
    """Full-size PuLID-FLUX v0.9.1 modules (IDFormer + 20 cross-attention layers on FLUX's 3072-wide
    tokens) and EVA02-CLIP-L-336 into the identity folders, in the real file layouts. The face
    detector, ArcFace and the parser stay tiny: they cost milliseconds and megabytes at any size."""
    import timm
    import torch
    from safetensors.torch import save_file

    from paletta_server.engines.pulid import EVA_ARCHITECTURE, IDFormerShape, PulidModules

    start = time.perf_counter()
    with torch.device("cuda"):
        modules = PulidModules(IDFormerShape(), 20, 3072, 16, 2048).to(torch.bfloat16)
        eva = timm.create_model(EVA_ARCHITECTURE, pretrained=False, num_classes=768).to(torch.bfloat16)
    pulid_params = sum(p.numel() for p in modules.parameters())
    eva_params = sum(p.numel() for p in eva.parameters())
    save_file({k: v.contiguous() for k, v in modules.state_dict().items()},
              str(extra["pulid-flux"] / "pulid_flux_v0.9.1.safetensors"))
    save_file({f"visual.trunk.{k}": v.contiguous() for k, v in eva.state_dict().items() if "rope" not in k},
              str(extra["eva02-clip-l-336"] / "open_clip_model.safetensors"))
    (extra["eva02-clip-l-336"] / "config.json").write_text(json.dumps({
        "architecture": EVA_ARCHITECTURE, "num_classes": 768,
        "pretrained_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711], "input_size": [3, 336, 336]},
    }))
    del modules, eva
    res.put("build.identity", {"pulid_params": pulid_params, "eva_params": eva_params,
                               "seconds": time.perf_counter() - start})
    res.say(f"built full-size PuLID modules ({pulid_params / 1e9:.2f} B) and EVA02-L ({eva_params / 1e9:.2f} B)")


def build_full_hyper_lora(res: Results, folder: Path) -> None:
    """A random LoRA of the real Hyper-SD FLUX size (``HYPER_LORA_RANK`` on each linear layer of the
    full-size transformer's blocks, fp32, PEFT keys under ``transformer.``), replacing the tiny file."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from paletta_server.models.registry import SPECS

    start = time.perf_counter()
    with torch.device("meta"):
        shapes = FluxTransformer2DModel(**FULL["transformer"])
    generator = torch.Generator("cuda").manual_seed(0)
    tensors = {}
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    for name, module in shapes.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(blocks):
            for part, shape in (("lora_A", (HYPER_LORA_RANK, module.in_features)),
                                ("lora_B", (module.out_features, HYPER_LORA_RANK))):
                tensors[f"transformer.{name}.{part}.weight"] = (
                    torch.randn(shape, generator=generator, device="cuda") * 1e-3).cpu()
    filename = next(spec.filename for spec in SPECS if spec.key == "hyper-sd")
    save_file(tensors, str(folder / filename))
    params = sum(t.numel() for t in tensors.values())
    res.put("build.hyper_lora", {"params": params, "bytes": (folder / filename).stat().st_size,
                                 "seconds": time.perf_counter() - start})
    res.say(f"built a full-size Hyper-SD-like LoRA: {params / 1e6:.0f} M parameters, "
            f"{(folder / filename).stat().st_size / 1e9:.2f} GB")


def build_full_qwen(res: Results, work: Path, folder: Path) -> None:
    """Free the FLUX weights from the tmpfs first (Qwen's 57 GB would not fit beside them)."""
    shutil.rmtree(work / "full", ignore_errors=True)
    shutil.rmtree(work / "data-memory" / "models" / "nf4-cache", ignore_errors=True)  # FLUX's NF4 copies
    full = work / "full-qwen"
    for name, component in (("qwen_transformer", "transformer"), ("qwen_text_encoder", "text_encoder"),
                            ("qwen_vae", "vae")):
        res.put(f"build.{name}", build_full_component(name, full / component,
                                                      tiny_config=folder / "text_encoder"))
        res.say(f"built full-size {name}: {res.data['build'][name]['params'] / 1e9:.2f} B parameters")
        swap_in(folder, component, full / component)


async def memory_job(res: Results, server: Server, kind: str, args: argparse.Namespace) -> None:
    """One job at ``--res`` under the cap: pass/fail with the reason, peak memory, s/step, offload, evictions."""
    client, size, steps = server.client, args.res, args.memory_steps
    picture = Image.fromarray(photo_like(size), "RGB")
    if kind == "identity":
        from tests.helpers import face_photo  # a face the (tiny) InsightFace detector finds

        face_asset = (await client.upload(face_photo(small_face=False))).name
    elif kind != "generate":
        asset = (await client.upload(picture)).name
    if kind == "inpaint":
        mask = Image.new("L", (size, size), 0)
        mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
        mask_asset = (await client.upload(mask)).name
    starts = {
        "generate": lambda: client.generate(PROMPT, width=size, height=size, steps=steps, seed=1),
        "edit": lambda: client.edit(asset, EDIT_PROMPT, steps=steps, seed=1),
        "inpaint": lambda: client.inpaint(asset, mask_asset, FILL_PROMPT, steps=steps, seed=1),
        "control": lambda: client.control(asset, PROMPT, "canny", preprocess="canny", steps=steps, seed=1),
        "qwen_edit": lambda: client.qwen_edit(asset, EDIT_PROMPT, steps=steps, seed=1),
        "identity": lambda: client.identity(face_asset, PROMPT, width=size, height=size, steps=steps, seed=1),
    }
    await asyncio.to_thread(_reset_peak)
    wall0, t0 = time.time(), time.perf_counter()
    events = []
    figures: dict[str, Any] = {"steps": steps, "size": [size, size]}
    try:
        job = await starts[kind]()
        async for event in job:
            events.append((event, time.time()))
    except Exception as exc:  # a refused call, a broken stream: recorded, the stage goes on
        figures["error"] = f"{type(exc).__name__}: {exc}"[:500]
    figures["seconds"] = time.perf_counter() - t0
    final = events[-1][0] if events else None
    finished = final is not None and final.WhichOneof("kind") == "finished"
    failed = not finished or final.finished.job.HasField("error")
    figures["passed"] = not failed
    if finished and final.finished.job.HasField("error"):
        error = final.finished.job.error
        figures["error"] = error.message[:500]
        from google.rpc import error_details_pb2

        for detail in error.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                figures["reason"], figures["metadata"] = info.reason, dict(info.metadata)
    stages = [(e.progress.stage, e.progress.model) for e, _ in events if e.WhichOneof("kind") == "progress"]
    figures["offloaded"] = any(stage == "offloading" for stage, _ in stages)
    figures["evicted"] = sorted({model for stage, model in stages if stage == "evicting"})
    line = timeline({"events": events, "wall0": wall0})
    if line and steps > 1:
        figures["s_per_step"] = line["first_to_last_step"] / 1000 / (steps - 1)
    figures.update(_peak_memory())
    status = await client.status()
    figures["resident_bytes"] = {m.key: m.bytes for m in status.loaded_models}
    res.put(f"memory.jobs.{kind}", figures)
    peak = figures.get("peak_allocated_bytes", figures.get("peak_rss_bytes", 0))
    res.say(f"memory {kind}: {'PASS' if figures['passed'] else 'FAIL'} in {figures['seconds']:.1f} s, peak "
            f"{peak / 2**30:.2f} GiB, {figures.get('s_per_step', 0):.3f} s/step"
            f"{', offloaded' if figures['offloaded'] else ''}"
            f"{', evicted ' + ','.join(figures['evicted']) if figures['evicted'] else ''}"
            + ("" if figures["passed"] else f"; {figures.get('reason', '')} {figures.get('error', '')[:200]}"))


def uncapped(cap: int, build, *args):  # noqa: ANN001, ANN201
    """A stage body that builds full-size weights on the GPU with the server's cap lifted (the cap
    emulates the card the server runs on, not the benchmark's weight factory), then puts it back."""
    from paletta_server.models.device import apply_memory_cap, release_memory_cap

    async def body():  # noqa: ANN202
        release_memory_cap()
        try:
            return await asyncio.to_thread(build, *args)
        finally:
            free_device_memory()
            apply_memory_cap(cap)

    return body


async def run_memory_stage(res: Results, args: argparse.Namespace, work: Path, folders: dict[str, Path]) -> None:
    from paletta_server.config import parse_size
    from paletta_server.models.device import release_memory_cap

    cap = parse_size(args.memory_budget)
    est = ESTIMATES[args.size]
    kinds = []
    for kind in MEMORY_KINDS:
        if kind in args.skip:
            continue
        missing = missing_packages(kind)
        broken = [name for name in FULL_BUILDERS.get(kind, ()) if "error" in res.data["preflight"].get(name, {})]
        if missing or (broken and args.size == "full"):
            reason = (f"needs {', '.join(missing)} (not installed)" if missing
                      else f"full-size {', '.join(broken)} does not build here (preflight)")
            res.append("skipped", {"stage": f"memory.{kind}", "reason": reason})
            res.say(f"skipping memory.{kind}: {reason}")
            continue
        kinds.append(kind)
    extra = build_memory_folders(res, work, args.size, kinds, args.memory_profile)
    for key, folder in extra.items():
        os.environ["PALETTA_MODEL_" + key.upper().replace("-", "_").replace(".", "_")] = str(folder)
    if args.size == "full" and args.memory_profile == "hyper" and not await stage(
            res, "memory.build_hyper_lora", uncapped(0, build_full_hyper_lora, res, extra["hyper-sd"])):
        return
    data = work / "data-memory"
    data.mkdir(parents=True, exist_ok=True)
    os.environ["PALETTA_NF4_CACHE_DIR"] = str(data / "models" / "nf4-cache")
    res.put("memory.setup", {"memory_budget": args.memory_budget, "cap_bytes": cap, "profile": args.memory_profile,
                             "res": args.res, "steps": args.memory_steps,
                             # what earlier stages left on the GPU counts against the cap, unplanned
                             "carried_in": device_memory()})
    try:
        async with Server(data, args.memory_profile, memory_budget=cap) as server:
            status = await server.client.status()
            res.put("memory.status", {"memory_cap_bytes": status.memory_cap_bytes,
                                      "memory_budget_bytes": status.memory_budget_bytes,
                                      "inference_edge": status.inference_edge, "max_edge": status.max_edge,
                                      "keep_two_families": status.keep_two_families})
            res.say(f"memory: cap {cap / 2**30:.2f} GiB, budget {status.memory_budget_bytes / 2**30:.2f} GiB, "
                    f"inference edge {status.inference_edge}, two families {status.keep_two_families}")
            for kind in kinds:
                need = est["memory_job"]
                if args.size == "full":
                    need += {"inpaint": est["build_fill"], "control": est["build_control"],
                             "identity": est["build_identity"],
                             "qwen_edit": est["build_qwen"] + est["qwen_job"] - est["memory_job"]}.get(kind, 0)
                if not fits(res, args, f"memory.{kind}", need):
                    continue
                if args.size == "full" and kind == "inpaint" and "transformer_fill" not in res.data["build"] \
                        and not (room_for_fill(res, work, args.size) and await stage(
                            res, "memory.build_fill", uncapped(cap, build_fill_transformer, res, work, folders))):
                    continue
                if args.size == "full" and kind == "control" and not await stage(
                        res, "memory.build_control",
                        uncapped(cap, build_full_controlnet, res, work, extra["flux-controlnet-union"])):
                    continue
                if args.size == "full" and kind == "identity" and not await stage(
                        res, "memory.build_identity", uncapped(cap, build_full_identity, res, work, extra)):
                    continue
                if kind == "qwen_edit":  # its text encoder's full config comes from the tiny build
                    built = preflight(res, ("qwen_text_encoder",), extra["qwen-image-edit"] / "text_encoder")
                    if not built and args.size == "full":
                        res.append("skipped", {"stage": "memory.qwen_edit", "reason": "preflight"})
                        continue
                if args.size == "full" and kind == "qwen_edit":
                    await server.client.unload_models()
                    build_qwen = uncapped(cap, build_full_qwen, res, work, extra["qwen-image-edit"])
                    if not await stage(res, "memory.build_qwen", build_qwen):
                        continue
                await stage(res, f"memory.{kind}", lambda k=kind: memory_job(res, server, k, args))
    finally:
        release_memory_cap()



# -- orchestration ---------------------------------------------------------------------------------
# Seconds each stage is expected to take (full size on an H100; tiny on a 2-core CPU), for the budget;
# a measured kind makes 2 × runs direct calls (without and with previews), each carried by a 1-step job.
STAGES = ("fast", "quality", "turbo", "memory")  # what --only can name
ESTIMATES = {
    "full": {"generate": 25, "edit": 75, "fill": 75, "profile": 70, "restart": 25, "build_fill": 35, "turbo": 120,
             "memory_job": 25, "build_control": 15, "build_identity": 20, "build_qwen": 100,
             "qwen_job": 90},
    "tiny": {"generate": 5, "edit": 5, "fill": 5, "profile": 5, "restart": 5, "build_fill": 0, "turbo": 60,
             "memory_job": 5, "build_control": 0, "build_identity": 0, "build_qwen": 0,
             "qwen_job": 5},
}
LOAD_LOG: list[str] = []
INTERRUPTED = 3  # main's exit status when the run was cut off (gpu_device.sh maps its timeout to it too)


class _LoadLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        LOAD_LOG.append(f"{time.strftime('%H:%M:%S')} {record.getMessage()}")


def fits(res: Results, args: argparse.Namespace, name: str, estimate: float) -> bool:
    if res.elapsed() + estimate <= args.budget_s:
        return True
    res.append("skipped", {"stage": name, "estimate_s": estimate, "at_s": round(res.elapsed(), 1)})
    res.say(f"skipping {name}: {estimate} s would pass the budget of {args.budget_s} s")
    return False


async def stage(res: Results, name: str, body: Callable[[], Awaitable[Any]]) -> bool:
    """Run one stage; a failure is recorded and the run goes on with the next stage. summary.md is
    rewritten after each, so a run cut off later still leaves it."""
    try:
        await body()
        return True
    except Exception as exc:
        res.append("errors", {"stage": name, "error": f"{type(exc).__name__}: {exc}"[:2000],
                              "traceback": traceback.format_exc()[-4000:]})
        res.say(f"{name} failed: {type(exc).__name__}: {str(exc)[:300]}")
        return False
    finally:
        summarize(res, show=False)


def meta(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"size": args.size, "res": args.res, "steps": args.steps, "edit_steps": args.edit_steps,
                            "runs": args.runs, "budget_s": args.budget_s, "python": platform.python_version(),
                            "work_dir": str(work), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        import diffusers
        import torch

        info.update(torch=torch.__version__, diffusers=diffusers.__version__, cuda=torch.version.cuda)
        try:
            import torchao

            info["torchao"] = torchao.__version__
        except ImportError:
            info["torchao"] = None
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    except ImportError:
        pass
    return info


async def run_profile_stages(res: Results, args: argparse.Namespace, work: Path, folders: dict[str, Path],
                             data: dict[str, Path], est: dict[str, float]) -> None:
    """Everything but the memory stage, or what ``--only`` names of fast and quality."""
    if args.only is not None:
        for profile in ("fast", "quality"):
            if profile in args.only and fits(res, args, profile, est["profile"]):
                await stage(res, profile, lambda p=profile: run_profile_stage(res, p, data[p], ["generate", "edit"],
                                                                              args, p))
        return
    for profile in ("fast", "quality"):
        if fits(res, args, profile, est["profile"]):
            await stage(res, profile, lambda p=profile: run_profile_stage(res, p, data[p], ["generate", "edit"],
                                                                          args, p))
    if fits(res, args, "fast_restart", est["restart"]):
        kinds = []
        if "fill" not in args.skip and res.elapsed() + est["restart"] + est["build_fill"] + est["fill"] \
                <= args.budget_s and room_for_fill(res, work, args.size):
            built = args.size != "full" or await stage(
                res, "build_fill", lambda: asyncio.to_thread(build_fill_transformer, res, work, folders))
            kinds = ["fill"] if built else []
        await stage(res, "fast_restart", lambda: run_profile_stage(res, "fast", data["fast"], kinds, args,
                                                                   "fast_restart"))
    if "turbo" not in args.skip:
        await run_turbo_stages(res, args, data, est)
    fill_ready = "fill" not in args.skip and (args.size != "full" or "transformer_fill" in res.data["build"])
    if fill_ready and fits(res, args, "quality_fill", est["fill"] + 10):
        await stage(res, "quality_fill", lambda: run_profile_stage(res, "quality", data["quality"], ["fill"], args,
                                                                   "quality_fill", first_image=False))


async def run_turbo_stages(res: Results, args: argparse.Namespace, data: dict[str, Path],
                           est: dict[str, float]) -> None:
    """turbo with an empty compile cache (Generate and Edit), then again on the same data dir."""
    if fits(res, args, "turbo", est["turbo"]):
        await stage(res, "turbo", lambda: run_profile_stage(res, "turbo", data["turbo"], ["generate", "edit"], args,
                                                            "turbo"))
    if fits(res, args, "turbo_restart", est["restart"]):
        await stage(res, "turbo_restart", lambda: run_profile_stage(res, "turbo", data["turbo"], [], args,
                                                                    "turbo_restart"))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    res = Results(Path(args.out), time.monotonic())
    handler = _LoadLogHandler(logging.INFO)
    for name in ("paletta_server.engines.nf4_cache",):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    try:  # the pipelines' own loading bars would flood the log
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass
    work = Path(args.work) if args.work else work_dir(args.size, 70 * 1024**3)
    work.mkdir(parents=True, exist_ok=True)
    try:
        res.put("meta", meta(args, work))
        res.say(f"benchmark {args.size}: {res.data['meta'].get('gpu', 'cpu')}, work dir {work}")
        preflight(res, FLUX_COMPONENTS + ("controlnet", "qwen_transformer", "qwen_vae"))
        folders = build_models(res, work, args.size)
        res.say(f"models ready in {res.data['build']['total_s']:.1f} s")
        for key, folder in folders.items():
            os.environ["PALETTA_MODEL_" + key.upper().replace("-", "_")] = str(folder)
        data = {profile: work / f"data-{profile}" for profile in ("fast", "quality", "turbo")}
        for folder in data.values():
            folder.mkdir(parents=True, exist_ok=True)
        os.environ["PALETTA_NF4_CACHE_DIR"] = str(data["fast"] / "models" / "nf4-cache")
        # where `paletta serve` puts inductor's cache (environment.py); set before torch reads it
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(data["turbo"] / "cache" / "torchinductor")
        est = ESTIMATES[args.size]

        # 1. fast: first image, Generate ratio, Kontext. 2. quality: the same. 3. fast again: NF4 cache warm.
        # 4. turbo, cold then warm compile cache. 5. the memory cap stage. --only: the stages it names,
        # fast and quality, then memory, then turbo (the least certain to fit: it compiles).
        await run_profile_stages(res, args, work, folders, data, est)
        if "memory" not in args.skip and (args.only is None or "memory" in args.only):
            await stage(res, "memory", lambda: run_memory_stage(res, args, work, folders))
        if args.only is not None and "turbo" in args.only:
            await run_turbo_stages(res, args, data, est)
        return res.data
    finally:  # also when the run is interrupted (SIGINT: gpu_device.sh's timeout sends it)
        res.flush()
        summarize(res)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def summarize(res: Results, show: bool = True) -> None:
    """A short table in <out>/summary.md (and on stdout with ``show``)."""
    lines = ["| figure | " + " | ".join(res.data["profiles"]) + " |", "|---|" + "---|" * len(res.data["profiles"])]

    def row(label: str, fn: Callable[[dict], str]) -> None:
        cells = []
        for figures in res.data["profiles"].values():
            try:
                cells.append(fn(figures))
            except (KeyError, TypeError, ZeroDivisionError, IndexError):
                cells.append("")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("first image after start (s)", lambda f: f"{f['first_image_s']:.2f}")
    row("quantization", lambda f: f["generate"]["quantization"])
    row("compile cache hits / misses", lambda f: f"{f['compile']['fxgraph_cache_hit']} / "
        f"{f['compile']['fxgraph_cache_miss']}")
    for kind in ("generate", "edit", "fill"):
        row(f"{kind}: gRPC / direct (s)", lambda f, k=kind: f"{f[k]['grpc_median_s']:.3f} / "
            f"{f[k]['direct_median_s']:.3f} = {f[k]['ratio']:.3f}")
        row(f"{kind}: gRPC / direct with the job's previews", lambda f, k=kind: f"{f[k]['ratio_with_previews']:.3f}")
        row(f"{kind}: GC pauses ms, gRPC / direct (all runs)", lambda f, k=kind: f"{sum(f[k]['gc']['grpc']['ms']):.1f}"
            f" / {sum(f[k]['gc']['direct']['ms']):.1f}")
        row(f"{kind}: s/step, overhead ms (of which previews)", lambda f, k=kind: f"{f[k]['s_per_step_direct']:.3f}, "
            f"{f[k]['overhead_ms']:.0f} ({f[k]['previews_ms']:+.0f})")
        row(f"{kind}: progress latency p50 / max ms", lambda f, k=kind: f"{f[k]['progress_latency_ms']['p50']:.1f} / "
            f"{f[k]['progress_latency_ms']['max']:.1f}")
        row(f"{kind}: resident / peak GB", lambda f, k=kind: f"{sum(f[k]['resident_bytes'].values()) / 1e9:.1f} / "
            f"{f[k].get('peak_allocated_bytes', f[k].get('peak_rss_bytes', 0)) / 1e9:.1f}")
        row(f"{kind}: PNG Pillow / encode_png ms", lambda f, k=kind: f"{f[k]['png']['pillow_level1_ms']:.1f} / "
            f"{f[k]['png']['encode_png_ms']:.1f}")
    jobs = res.data.get("memory", {}).get("jobs", {})
    if jobs:
        setup = res.data["memory"].get("setup", {})
        lines += ["", f"memory cap {setup.get('memory_budget', '')} ({setup.get('profile', '')}, "
                  f"{setup.get('res', '')}², {setup.get('steps', '')} steps)", "",
                  "| capability | pass | peak GiB | s/step | offloaded | evicted | error |",
                  "|---|---|---|---|---|---|---|"]
        for kind, f in jobs.items():
            peak = f.get("peak_allocated_bytes", f.get("peak_rss_bytes", 0)) / 2**30
            lines.append(f"| {kind} | {'PASS' if f.get('passed') else 'FAIL'} | {peak:.2f} | "
                         f"{f.get('s_per_step', 0):.3f} | {'yes' if f.get('offloaded') else ''} | "
                         f"{', '.join(f.get('evicted', []))} | {f.get('reason', '')} {f.get('error', '')[:120]} |")
    text = "\n".join(lines)
    (res.out / "summary.md").write_text(text + "\n")
    if show:
        print(text, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--out", default="bench-out/gpu")
    parser.add_argument("--res", type=int, help="image edge (default 1024 full, 256 tiny)")
    parser.add_argument("--steps", type=int, default=4, help="Generate steps (schnell)")
    parser.add_argument("--edit-steps", type=int, help="Kontext / Fill steps (default 8 full, --steps tiny)")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--budget-s", type=float, help="skip stages that would end later (default 360 full)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("fill", "turbo", "memory") + MEMORY_KINDS,
                        help="stages, or memory-stage jobs (generate, edit, … name those only), to leave out")
    parser.add_argument("--only", nargs="+", choices=STAGES,
                        help="run only these stages (and the builds they need), e.g. --only quality turbo memory")
    parser.add_argument("--memory-budget", default="16GiB", help="the memory stage's cap (default 16GiB)")
    parser.add_argument("--memory-profile", default="fast", choices=("fast", "hyper"))
    parser.add_argument("--memory-steps", type=int, help="steps of a memory-stage job (default 4 full, --steps tiny)")
    parser.add_argument("--work", help="folder for weights and data dirs (default: a tmpfs when it has room)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    full = args.size == "full"
    args.res = args.res or (1024 if full else 256)
    args.edit_steps = args.edit_steps or (8 if full else args.steps)
    args.budget_s = args.budget_s or (360.0 if full else 600.0)
    args.memory_steps = args.memory_steps or (4 if full else args.steps)
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    args = parse_args(argv)
    if args.size == "full" and _cuda() is None:
        print("--size full needs a CUDA GPU; use --size tiny on a CPU", file=sys.stderr)
        return 2
    try:
        data = asyncio.run(run(args))
    except KeyboardInterrupt:  # SIGINT (gpu_device.sh's timeout): results.json and summary.md are written
        print("interrupted: the figures so far are in", args.out, file=sys.stderr)
        return INTERRUPTED
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
