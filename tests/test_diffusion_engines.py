"""Diffusion engines on tiny random-weight models built into a folder and loaded back by the real loaders."""

from __future__ import annotations

import dataclasses
import re
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from paletta.v1 import control_pb2 as control_pb
from paletta.v1 import image_pb2
from paletta_server.capabilities import common, diffusion_io
from paletta_server.capabilities.inpaint import outpaint_canvas
from paletta_server.engines.common import import_object
from paletta_server.errors import JobCancelled, ModelUnavailable
from paletta_server.models.profiles import PROFILES
from paletta_server.models.registry import SPECS
from paletta_server.models.styles import StyleRegistry
from paletta_server.models.types import Device, LoadContext, ModelSource

KEYS = ["flux-schnell", "flux-kontext", "flux-fill", "flux-dev", "flux-controlnet-union", "ip-adapter",
        "clip-vit-large", "hyper-sd", "qwen-image-edit"]
SPEC = {s.key: s for s in SPECS}


class Sink:
    def __init__(self, cancel_at: int | None = None):
        self.steps: list[tuple[int, int, str]] = []
        self.previews: list[Image.Image] = []
        self.cancel_at = cancel_at

    def progress(self, step, total, stage):
        self.steps.append((step, total, stage))

    def preview(self, image, step):
        self.previews.append(image)

    def check_cancelled(self):
        if self.cancel_at is not None and len(self.steps) >= self.cancel_at:
            raise JobCancelled("x")


class Models:
    """Builds tiny models into a folder on first use and loads them with the registry loaders."""

    def __init__(self, root: Path, profile=PROFILES["tiny"]):
        self.root = root
        self.profile = profile
        self.loaded: dict[str, object] = {}
        self.loads: dict[str, int] = {}
        self.lc = LoadContext(profile, Device("cpu", "fp32"), self.source)

    def source(self, key: str) -> ModelSource:
        path = self.root / key
        if not (path / ".complete").exists():
            path.mkdir(parents=True, exist_ok=True)
            import_object(SPEC[key].tiny_builder)(path)
            (path / ".complete").touch()
        return ModelSource(key, path=path, filename=SPEC[key].filename)

    def model(self, key: str):
        if key not in self.loaded:
            self.loaded[key] = import_object(SPEC[key].loader)(self.source(key), self.lc)
            self.loads[key] = self.loads.get(key, 0) + 1
        return self.loaded[key]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    return Models(tmp_path_factory.mktemp("engine-models"))


def job_ctx(models: Models, tmp_path: Path, images: dict[str, Image.Image] | None = None, profile=None):
    """A RunContext stand-in: styles, profile, models, images by name."""
    ctx = types.SimpleNamespace()
    ctx.styles = StyleRegistry(tmp_path)
    ctx.profile = profile or models.profile
    ctx.config = types.SimpleNamespace(models_dir=models.root.parent / "models-dir")
    ctx.model = models.model
    ctx.open_image = lambda name: (images or {})[name]
    return ctx


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def gradient(size=(64, 64)) -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    y = np.linspace(0, 255, size[1], dtype=np.uint8)
    rgb = np.stack([np.tile(x, (size[1], 1)), np.tile(y[:, None], (1, size[0])), np.full((size[1], size[0]), 90,
                                                                                             np.uint8)], axis=-1)
    return Image.fromarray(rgb, "RGB")


def test_every_tiny_build_loads_back_through_its_registry_loader(models):
    from diffusers import FluxControlNetPipeline, FluxFillPipeline, FluxKontextPipeline, QwenImageEditPipeline

    assert isinstance(models.model("flux-kontext"), FluxKontextPipeline)
    assert isinstance(models.model("flux-fill"), FluxFillPipeline)
    control = models.model("flux-controlnet-union")
    assert isinstance(control, FluxControlNetPipeline) and control.controlnet.config.num_mode == 10
    assert isinstance(models.model("qwen-image-edit"), QwenImageEditPipeline)
    assert models.model("flux-dev").path == models.root / "flux-dev"  # a source, loaded with the ControlNet
    weights = models.model("ip-adapter")
    assert set(weights.state_dict) == {"image_proj", "ip_adapter"} and weights.resident_bytes > 0
    assert models.model("clip-vit-large").config.projection_dim == 32
    assert models.model("hyper-sd").name == "Hyper-FLUX.1-dev-8steps-lora.safetensors"


def test_kontext_edit_size_progress_previews_and_determinism(models):
    from paletta_server.engines import flux_edit

    pipe = models.model("flux-kontext")
    sink = Sink()
    a = flux_edit.edit(pipe, sink, image=gradient((96, 64)), prompt="make it blue", steps=3, seed=5, guidance=2.5,
                       preview_every=1)
    b = flux_edit.edit(pipe, Sink(), image=gradient((96, 64)), prompt="make it blue", steps=3, seed=5, guidance=2.5)
    c = flux_edit.edit(pipe, Sink(), image=gradient((96, 64)), prompt="make it blue", steps=3, seed=6, guidance=2.5)
    assert a.size == (96, 64)
    assert [s[0] for s in sink.steps] == [1, 2, 3] and len(sink.previews) == 2
    assert [p.size for p in sink.previews] == [(12, 8), (12, 8)]  # one pixel per latent (VAE factor 8)
    assert (pixels(a) == pixels(b)).all() and not (pixels(a) == pixels(c)).all()


def test_linear_preview_maps_latent_channels_to_rgb():
    import torch

    from paletta_server.engines.common import linear_preview

    latents = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)) / 2
    pending = linear_preview(latents, weights)
    x = torch.cat([latents.reshape(4, -1).T, torch.ones(15, 1)], dim=1)
    expected = ((x @ weights).clamp(-1, 1) + 1) * 127.5
    got = np.asarray(pending.image(), dtype=np.float64)
    assert pending.ready() and got.shape == (3, 5, 3)  # on the CPU there is nothing to wait for
    assert np.abs(got - expected.reshape(3, 5, 3).numpy()).max() <= 1.0
    assert len(np.unique(got)) > 10  # not a flat image


def test_a_preview_is_sent_once_its_pixels_land_and_one_still_in_flight_at_the_end_is_dropped():
    import torch

    from paletta_server.engines.common import PendingPreview, step_callback

    class Copy:  # a CUDA event's query(): the copy lands after a number of checks
        def __init__(self, checks: int):
            self.checks = checks

        def query(self) -> bool:
            self.checks -= 1
            return self.checks < 0

    calls: list[tuple] = []

    class Recorder(Sink):
        def progress(self, step, total, stage):
            calls.append(("progress", step))

        def preview(self, image, step):
            calls.append(("preview", step, image.size))

    started: list[int] = []

    def start(latents):
        started.append(len(started))
        return PendingPreview(torch.zeros(2, 3, 3, dtype=torch.uint8), Copy(checks=2))

    callback = step_callback(Recorder(), 7, start, preview_every=2)
    for step in range(7):
        callback(None, step, None, {"latents": object()})
    # started at steps 2, 4 and 6, each lands at its third check, two steps later; step 6's never does
    assert calls == [("progress", 1), ("progress", 2), ("progress", 3), ("progress", 4), ("preview", 2, (3, 2)),
                     ("progress", 5), ("progress", 6), ("preview", 4, (3, 2)), ("progress", 7)]
    assert len(started) == 3


def test_cancel_stops_between_steps(models):
    from paletta_server.engines import flux_edit

    sink = Sink(cancel_at=1)
    with pytest.raises(JobCancelled):
        flux_edit.fill(models.model("flux-fill"), sink, image=gradient(), mask=Image.new("L", (64, 64), 255),
                       prompt="x", steps=4, seed=1, guidance=30)
    assert [s[0] for s in sink.steps] == [1]


def test_fill_outpaint_canvas_and_mask(models):
    from paletta_server.engines import flux_edit

    canvas, mask = outpaint_canvas(gradient((32, 48)), 16, 16, 0, 16)
    assert canvas.size == (64, 64) and mask.size == (64, 64)
    m = np.asarray(mask)
    assert m[:48, 16:48].max() == 0 and m[:, :16].min() == 255 and m[48:].min() == 255
    out = flux_edit.fill(models.model("flux-fill"), Sink(), image=canvas, mask=mask, prompt="sea", steps=2, seed=1,
                         guidance=30)
    assert out.size == (64, 64)


@settings(max_examples=400, deadline=None)
@given(width=st.integers(1, 12000), height=st.integers(1, 12000), max_edge=st.sampled_from([16, 512, 768, 1024, 2048]))
def test_inference_size_fits_the_edge_in_multiples_of_16_without_upscaling_or_distortion(width, height, max_edge):
    """The seed's fit_long_edge, as properties (Hypothesis): every size, every profile edge."""
    w, h = diffusion_io.inference_size(width, height, max_edge)
    assert w % 16 == 0 and h % 16 == 0 and min(w, h) >= 16
    assert max(w, h) <= max_edge  # fits the profile's edge
    if max(width, height) >= max_edge:
        assert max(w, h) == max_edge  # a big input uses the whole edge (511.99… must not make 496)
    assert w <= max(16, width) and h <= max(16, height)  # never upscaled (16 px is the floor)
    scale = min(Fraction(1), Fraction(max_edge, max(width, height)))  # exact, unlike the float
    assert width * scale - 16 < w <= max(16, width * scale)  # each side as close to the scaled side
    assert height * scale - 16 < h <= max(16, height * scale)  # as a multiple of 16 allows


def test_round_trip_sizes_and_masks():
    assert diffusion_io.inference_size(2000, 1000, 1024) == (1024, 512)
    assert diffusion_io.inference_size(100, 70, 512) == (96, 64)
    assert diffusion_io.inference_size(3000, 20, 1024) == (1024, 16)
    assert diffusion_io.inference_size(561, 400, 512) == (512, 352)  # was (496, 352): a float's 511.99…
    assert diffusion_io.is_empty(Image.new("L", (8, 8), 3)) and not diffusion_io.is_empty(Image.new("L", (8, 8), 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    soft = diffusion_io.feathered(mask, 4)
    assert 0 < np.asarray(soft)[16, 32] < 255
    kept = diffusion_io.feathered(mask, 4, keep_inside=True)
    assert np.asarray(kept)[16, 32] == 255 and 0 < np.asarray(kept)[14, 32] < 255
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 0, 255))
    assert np.asarray(diffusion_io.mask_from(rgba))[1, 1] == 255


def _control(pipe, image, mode, scale, seed=3):
    from paletta_server.engines import control

    return control.control(pipe, Sink(), control_image=image, control_type=mode, control_scale=scale, prompt="a cat",
                           width=64, height=64, steps=2, seed=seed, guidance=3.5)


def test_control_mode_and_scale_change_output_and_scale_zero_is_no_control(models):
    from paletta_server.engines import control

    pipe = models.model("flux-controlnet-union")
    edges = control.canny_map(gradient())
    assert control.CONTROL_MODES == {control_pb.CONTROL_TYPE_CANNY: 0, control_pb.CONTROL_TYPE_DEPTH: 2,
                                     control_pb.CONTROL_TYPE_POSE: 4}
    canny = pixels(_control(pipe, edges, control_pb.CONTROL_TYPE_CANNY, 0.7))
    depth = pixels(_control(pipe, edges, control_pb.CONTROL_TYPE_DEPTH, 0.7))
    strong = pixels(_control(pipe, edges, control_pb.CONTROL_TYPE_CANNY, 1.0))
    off_canny = pixels(_control(pipe, edges, control_pb.CONTROL_TYPE_CANNY, 0.0))
    off_depth = pixels(_control(pipe, gradient(), control_pb.CONTROL_TYPE_DEPTH, 0.0))
    assert not (canny == depth).all() and not (canny == strong).all() and not (canny == off_canny).all()
    assert (off_canny == off_depth).all()
    # At scale 0 neither the map nor the mode matters: the ControlNet adds exactly nothing. (The pipeline
    # draws the map's VAE sample from the same generator first, so the noise is not the plain dev pipeline's.)


def test_canny_preprocessing_finds_edges():
    from paletta_server.engines import control

    photo = Image.new("RGB", (64, 64), (0, 0, 0))
    photo.paste((255, 255, 255), (20, 20, 44, 44))
    edges = np.asarray(control.canny_map(photo))[..., 0]
    assert edges.shape == (64, 64) and set(np.unique(edges)) <= {0, 255}
    assert edges[18:22, 30].max() == 255 and edges[32, 32] == 0 and edges[5, 5] == 0


def test_ip_adapter_weight_changes_output_zero_equals_baseline_and_unloads(models, tmp_path):
    from paletta_server.engines import flux, ip_adapter

    pipe = models.model("flux-schnell") if "flux-schnell" in models.loaded else import_object(
        SPEC["flux-schnell"].loader)(models.source("flux-schnell"), models.lc)
    models.loaded["flux-schnell"] = pipe
    weights, encoder = models.model("ip-adapter"), models.model("clip-vit-large")

    def gen(**extra):
        return pixels(flux.text_to_image(pipe, Sink(), prompt="a cat", width=64, height=64, steps=2, seed=4,
                                         guidance=0.0, **extra))

    baseline = gen()
    results = {}
    for weight in (0.0, 0.7, 1.5):
        with ip_adapter.applied_image_prompt(pipe, weights, encoder, gradient(), weight) as kwargs:
            assert list(kwargs) == ["ip_adapter_image"]
            results[weight] = gen(**kwargs)
    assert (results[0.0] == baseline).all()
    assert not (results[0.7] == baseline).all() and not (results[0.7] == results[1.5]).all()
    assert pipe.transformer.encoder_hid_proj is None
    assert (gen() == baseline).all()


def test_an_offloaded_pipeline_gives_the_shared_image_encoder_back(models):
    """Model CPU offload ends each call by offloading every component the pipeline holds; the CLIP
    encoder the IP-Adapter borrowed (a resident model of its own) must come back without a hook."""
    from paletta_server.engines import flux, ip_adapter

    pipe = import_object(SPEC["flux-schnell"].loader)(models.source("flux-schnell"), models.lc)
    pipe.enable_model_cpu_offload(device="cpu")  # the real hooks, with the CPU as the "GPU"
    weights, encoder = models.model("ip-adapter"), models.model("clip-vit-large")
    for _ in range(2):
        with ip_adapter.applied_image_prompt(pipe, weights, encoder, gradient(), 0.7) as kwargs:
            flux.text_to_image(pipe, Sink(), prompt="a cat", width=64, height=64, steps=2, seed=4, guidance=0.0,
                               **kwargs)
        assert pipe.image_encoder is None and pipe.transformer.encoder_hid_proj is None
        assert not any(hasattr(m, "_hf_hook") for m in encoder.modules())


def _half_mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    return mask


def run_family(key: str, pipe, sink: Sink) -> Image.Image:
    """One small job of a diffusion family, previews at every step."""
    from paletta_server.engines import control, flux, flux_edit, qwen

    common_args = dict(steps=2, preview_every=1)
    if key == "flux-schnell":
        return flux.text_to_image(pipe, sink, prompt="a cat", width=64, height=64, seed=4, guidance=0.0, **common_args)
    if key == "flux-kontext":
        return flux_edit.edit(pipe, sink, image=gradient(), prompt="make it blue", seed=5, guidance=2.5, **common_args)
    if key == "flux-fill":
        return flux_edit.fill(pipe, sink, image=gradient(), mask=_half_mask(), prompt="sea", seed=1, guidance=30,
                              **common_args)
    if key == "flux-controlnet-union":
        return control.control(pipe, sink, control_image=gradient(), control_type=control_pb.CONTROL_TYPE_CANNY,
                               control_scale=0.7, prompt="a cat", width=64, height=64, seed=3, guidance=3.5,
                               **common_args)
    assert key == "qwen-image-edit"
    return qwen.edit(pipe, sink, image=gradient((64, 48)), prompt="make it red", negative_prompt="", seed=1,
                     guidance=4.0, **common_args)


@pytest.mark.parametrize("key", ["flux-schnell", "flux-kontext", "flux-fill", "flux-controlnet-union",
                                 "qwen-image-edit"])
def test_model_cpu_offload_changes_no_pixel(models, key):
    """When the memory budget needs it a family runs under diffusers' model CPU offload. With the real
    accelerate hooks (the CPU standing in for the GPU) it must give the whole pipeline's pixels and
    previews, again on a second call (the hooks re-arm at the end of each)."""
    pipe = import_object(SPEC[key].loader)(models.source(key), models.lc)  # offloading changes it for good
    whole_sink = Sink()
    whole = pixels(run_family(key, pipe, whole_sink))
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):
        sink = Sink()
        assert (pixels(run_family(key, pipe, sink)) == whole).all()
        assert sink.steps == whole_sink.steps
        assert [pixels(p).tolist() for p in sink.previews] == [pixels(p).tolist() for p in whole_sink.previews]


@pytest.mark.parametrize(("toml", "message"), [
    ('[[styles]]\nlabel = "no name"\npath = "a.safetensors"\n', "style entry 1 needs a name"),
    ('[heavy]\ndefault_weight = 5.0\npath = "a.safetensors"\n', "default_weight must be a number in [0, 2]"),
    ('[heavy]\ndefault_weight = "1"\npath = "a.safetensors"\n', "default_weight must be a number in [0, 2]"),
    ('[pk]\npath = "a.bin"\n', "must be a .safetensors file"),
    ('[nowhere]\nweight_name = "a.safetensors"\n', "needs a path, or a repo and a weight_name"),
])
def test_a_styles_file_with_a_bad_entry_is_refused_at_start_naming_it(tmp_path, toml, message):
    (tmp_path / "styles.toml").write_text(toml)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        StyleRegistry(tmp_path)
    assert str(tmp_path / "styles.toml") in str(err.value)
    (tmp_path / "styles.toml").write_text('[ok]\ndefault_weight = 2\npath = "a.safetensors"\n')
    assert StyleRegistry(tmp_path).get("ok").default_weight == 2.0


def test_a_style_file_that_is_not_safetensors_inside_is_model_unavailable_naming_the_style(tmp_path):
    import pickle

    (tmp_path / "fake.safetensors").write_bytes(pickle.dumps({"lora": [1, 2, 3]}))
    (tmp_path / "styles.toml").write_text('[fake]\npath = "fake.safetensors"\n')
    with pytest.raises(ModelUnavailable, match="not a valid safetensors file") as err:
        StyleRegistry(tmp_path).file("fake")
    assert err.value.metadata == {"style": "fake"}


def test_instantx_ip_adapter_is_refused_with_an_explanation(models, tmp_path):
    from paletta_server.engines import ip_adapter

    (tmp_path / "ip-adapter.bin").write_bytes(b"pickle")
    with pytest.raises(ModelUnavailable, match="InstantX"):
        ip_adapter.load_ip_adapter(ModelSource("ip-adapter", path=tmp_path, filename="ip_adapter.safetensors"),
                                   models.lc)
    with pytest.raises(ValueError, match="InstantX"):
        ip_adapter.xlabs_to_diffusers({"image_proj.proj.0.weight": 0, "ip_adapter.0.to_k_ip.weight": 0})


def test_styles_change_output_weight_zero_is_baseline_and_exit_is_clean(models, tmp_path):
    from paletta_server.engines import flux_edit, styles

    pipe = models.model("flux-kontext")
    ctx = job_ctx(models, tmp_path)
    calls = []
    original_load = pipe.load_lora_weights
    pipe.load_lora_weights = lambda *a, **k: (calls.append(k["adapter_name"]), original_load(*a, **k))[1]

    def edit(prompt="a house"):
        return pixels(flux_edit.edit(pipe, Sink(), image=gradient(), prompt=prompt, steps=2, seed=2, guidance=2.5))

    def sel(*pairs):  # resolved to LoraFiles the way capabilities do it (tiny builds, default weights)
        return common.style_loras(ctx, [image_pb2.StyleSelection(name=n, weight=w) for n, w in pairs])

    baseline = edit()
    with styles.applied_styles(pipe, sel(("tarot", 0.0)), None, "a house") as (prompt, applied):
        assert prompt == "a house" and applied[0]["weight"] == 0.0  # weight 0 = off, triggers too
        zero = edit(prompt)
    assert (zero == baseline).all()
    with styles.applied_styles(pipe, sel(("tarot", 1.0), ("koda", 0.5)), None, "a house") as (prompt, applied):
        assert prompt == "in the style of TOK a trtcrd tarot style, flmft style, a house"
    outs = {}
    for combo in [(("tarot", 1.0),), (("tarot", 1.8),), (("koda", 1.0),), (("tarot", 1.0), ("koda", 1.0))]:
        with styles.applied_styles(pipe, sel(*combo), None, "a house") as (prompt, applied):
            outs[combo] = edit()  # same prompt each time: the LoRA alone changes the image
            assert [a["name"] for a in applied] == [n for n, _ in combo]
    assert len({o.tobytes() for o in outs.values()} | {baseline.tobytes()}) == 5
    assert (edit() == baseline).all()  # the job's end switches styles off
    assert sorted(calls) == ["koda", "tarot"]  # each style loaded once into this pipeline


def test_hyper_profile_keeps_acceleration_lora_active_under_styles(models, tmp_path):
    from paletta_server.engines import flux_edit, styles
    from paletta_server.engines.flux_edit import load_kontext

    pipe = load_kontext(models.source("flux-kontext"), models.lc)  # a fresh pipeline of its own
    ctx = job_ctx(models, tmp_path, profile=dataclasses.replace(PROFILES["hyper"], tiny=True))

    def edit():
        return pixels(flux_edit.edit(pipe, Sink(), image=gradient(), prompt="a", steps=2, seed=2, guidance=2.5))

    plain = edit()
    acceleration = common.acceleration_lora(ctx)
    assert styles.ensure_acceleration(pipe, acceleration) == "hyper-sd"
    accelerated = edit()
    assert not (accelerated == plain).all()
    anime = common.style_loras(ctx, [image_pb2.StyleSelection(name="anime", weight=1.0)])
    with styles.applied_styles(pipe, anime, acceleration, "a"):
        assert set(pipe.get_active_adapters()) == {"anime", "hyper-sd"}
    assert pipe.get_active_adapters() == ["hyper-sd"] and (edit() == accelerated).all()


def test_qwen_edit_size_previews_and_seed(models):
    from paletta_server.engines import qwen

    pipe = models.model("qwen-image-edit")
    sink = Sink()
    a = qwen.edit(pipe, sink, image=gradient((64, 48)), prompt="make it red", negative_prompt="", steps=2, seed=1,
                  guidance=4.0, preview_every=1)
    b = qwen.edit(pipe, Sink(), image=gradient((64, 48)), prompt="make it red", negative_prompt="", steps=2,
                  seed=2, guidance=4.0)
    assert a.size == (64, 48) and [s[0] for s in sink.steps] == [1, 2] and len(sink.previews) == 1
    assert not (pixels(a) == pixels(b)).all()
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module

    assert module.calculate_dimensions(1024 * 1024, 1.0)[0] == 1024  # the cap is lifted after the job
