"""Vision and helper engines on tiny random-weight models built in the real formats.

Every model is written by its registry tiny builder and loaded back by its registry loader through
the ResidencyManager (the path a tiny-profile server takes), once for this module.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from paletta_server.config import load_config  # noqa: E402
from paletta_server.engines.common import measure_bytes  # noqa: E402
from paletta_server.errors import ModelUnavailable  # noqa: E402
from paletta_server.models.registry import ModelRegistry, ModelSource  # noqa: E402
from paletta_server.models.residency import ResidencyManager  # noqa: E402
from paletta_server.models.types import Device  # noqa: E402

KEYS = ["realesrgan-x4plus", "birefnet-general", "clipseg", "detr-resnet-50", "owlv2", "blip-large",
        "blip2-opt-2.7b", "qwen2.5-1.5b-instruct"]
CPU = Device("cpu", "fp32")


@pytest.fixture(scope="module")
def residency(tmp_path_factory: pytest.TempPathFactory) -> ResidencyManager:
    config = load_config(tmp_path_factory.mktemp("vision-data"), env={}, profile="tiny")
    return ResidencyManager(ModelRegistry(config, env={}), CPU, lambda used: 1 << 40)


@pytest.fixture(scope="module")
def models(residency: ResidencyManager) -> dict:
    return {key: residency.ensure_resident(key) for key in KEYS}


def photo(width: int = 160, height: int = 90, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_every_vision_model_builds_loads_and_is_measured(models, residency):
    for key in KEYS:
        assert models[key] is not None
        assert (residency.registry.source(key).path / ".complete").exists()
        assert measure_bytes(models[key]) > 0, key


# -- Real-ESRGAN -----------------------------------------------------------------------------------
def test_tiny_realesrgan_is_a_real_esrgan_checkpoint(models, residency):
    import torch

    path = residency.registry.source("realesrgan-x4plus").path / "RealESRGAN_x4plus.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state) == {"params_ema"} and "conv_first.weight" in state["params_ema"]
    model = models["realesrgan-x4plus"]
    assert model.scale == 4 and model.architecture.name in ("ESRGAN", "RealESRGAN")


def test_realesrgan_tiled_4x_matches_whole_image(models):
    import torch

    from paletta_server.engines import upscale

    model = models["realesrgan-x4plus"]
    image = photo(70, 45)
    ticks: list[tuple[int, int]] = []
    out = upscale.upscale_tiled(model, image, 4, tile=32, overlap=24,
                                on_tile=lambda d, t: ticks.append((d, t)))
    assert out.size == (280, 180) and out.mode == "RGB"
    assert upscale.tile_count(70, 45, 32) == 6 and ticks == [(i, 6) for i in range(1, 7)]
    with torch.inference_mode():
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
        whole = (model(x)[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    diff = np.abs(whole.astype(int) - np.asarray(out).astype(int))
    assert diff.max() <= 1, "tiles with enough overlap must reproduce the whole-image result"


class NearestX4:
    """A stand-in network: nearest-neighbour 4x, recording the patch sizes it is given."""

    scale = 4

    def __init__(self):
        import torch

        self.model = torch.nn.Conv2d(3, 3, 1)
        self.shapes: list[tuple[int, int]] = []

    def __call__(self, x):
        self.shapes.append(tuple(x.shape[-2:]))
        return x.repeat_interleave(4, -2).repeat_interleave(4, -1)


def test_tiler_places_every_tile_and_bounds_patch_size():
    from paletta_server.engines import upscale

    net = NearestX4()
    image = photo(101, 67, seed=3)
    out = upscale.upscale_tiled(net, image, None, tile=32, overlap=8)
    expected = image.resize((404, 268), Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    assert len(net.shapes) == upscale.tile_count(101, 67, 32) == 12
    assert max(max(s) for s in net.shapes) <= 32 + 2 * 8  # memory depends on the tile, not the image


def test_upscale_scale_alpha_lanczos_and_restore_size(models):
    from paletta_server.engines import upscale

    model = models["realesrgan-x4plus"]
    rgba = photo(40, 30).convert("RGBA")
    rgba.putalpha(Image.new("L", (40, 30), 77))
    out = upscale.upscale_tiled(model, rgba, 2.5, tile=64, overlap=8)
    assert out.size == (100, 75) and out.mode == "RGBA"
    assert abs(int(np.asarray(out.getchannel("A")).mean()) - 77) <= 1
    assert upscale.lanczos(photo(40, 30), 3).size == (120, 90)
    small = photo(40, 30)
    assert upscale.restore_size(small, (123, 77), "realesrgan", model).size == (123, 77)
    assert upscale.restore_size(small, (123, 77), "lanczos", None).size == (123, 77)
    from paletta.v1 import image_pb2

    ticks: list[int] = []
    tick = lambda d, t: ticks.append(d)  # noqa: E731
    restored = upscale.restore_size(small, (160, 120), image_pb2.UPSCALER_REALESRGAN, model, on_tile=tick)
    assert restored.size == (160, 120) and ticks  # the model ran
    ticks.clear()
    restored = upscale.restore_size(small, (160, 120), image_pb2.UPSCALER_LANCZOS, model, on_tile=tick)
    assert restored.size == (160, 120)
    assert not ticks


def test_missing_realesrgan_weights_fail_as_model_unavailable(tmp_path):
    from paletta_server.engines import upscale

    with pytest.raises(ModelUnavailable, match="RealESRGAN_x4plus.pth"):
        upscale.load_realesrgan(ModelSource("realesrgan-x4plus", path=tmp_path, filename="RealESRGAN_x4plus.pth"),
                                SimpleNamespace(device=CPU))


def test_realesrgan_x4plus_is_xinntaos_release_fetched_once_into_torchs_cache(tmp_path, monkeypatch, residency):
    """RealESRGAN_x4plus (the seed's) is a GitHub release asset: fetched by URL, kept in torch's cache."""
    import torch
    from huggingface_hub import constants

    from paletta_server.engines import upscale
    from paletta_server.models.registry import SPECS

    spec = next(s for s in SPECS if s.key == "realesrgan-x4plus")
    assert spec.repo == "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth"
    release = tmp_path / "release" / "RealESRGAN_x4plus.pth"  # the release, served from a file:// URL
    release.parent.mkdir()
    release.write_bytes((residency.source("realesrgan-x4plus").path / "RealESRGAN_x4plus.pth").read_bytes())
    source = ModelSource("realesrgan-x4plus", repo=release.as_uri(), filename="RealESRGAN_x4plus.pth")
    hub = tmp_path / "torch-hub"
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(FileNotFoundError, match="offline mode is on"):  # at once (MODEL_UNAVAILABLE in a job)
            upscale.load_realesrgan(source, SimpleNamespace(device=CPU))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        model = upscale.load_realesrgan(source, SimpleNamespace(device=CPU))
        got = hub / "checkpoints" / "RealESRGAN_x4plus.pth"
        assert model.scale == 4 and got.read_bytes() == release.read_bytes()
        assert [p.name for p in got.parent.iterdir()] == ["RealESRGAN_x4plus.pth"]  # no partial file left
        release.unlink()
        assert upscale.load_realesrgan(source, SimpleNamespace(device=CPU)).scale == 4  # cached: not fetched again
        got.write_bytes(got.read_bytes()[:1000])  # a download cut short by an older version, say
        with pytest.raises(ValueError, match="is not a readable checkpoint"):  # MODEL_UNAVAILABLE, in the job
            upscale.load_realesrgan(source, SimpleNamespace(device=CPU))
    finally:
        torch.hub.set_dir(previous)


# -- BiRefNet (rembg) --------------------------------------------------------------------------
def test_tiny_birefnet_has_the_real_interface(residency):
    import onnx

    model = onnx.load(str(residency.registry.source("birefnet-general").path / "birefnet-general.onnx"))
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(model.graph.input[0]) == [1, 3, 1024, 1024]
    assert dims(model.graph.output[0]) == [1, 1, 1024, 1024]


@pytest.mark.rembg
def test_remove_background_gives_rgba_with_subject_alpha(models):
    from paletta_server.engines import background

    image = Image.new("RGB", (300, 180), (15, 15, 15))
    ImageDraw.Draw(image).rectangle((100, 40, 200, 140), fill=(250, 250, 250))
    cutout, mask = background.remove_background(models["birefnet-general"], image)
    assert cutout.mode == "RGBA" and cutout.size == (300, 180) and mask.size == (300, 180)
    alpha = np.asarray(cutout.getchannel("A"))
    assert alpha[90, 150] > 200 and alpha[5, 5] < 30  # the tiny net keys on brightness
    assert np.array_equal(np.asarray(cutout.convert("RGB")), np.asarray(image))


def test_missing_birefnet_fails_fast_saying_where_to_put_it(tmp_path, monkeypatch):
    import time

    from paletta_server.engines import background

    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "nowhere"))
    start = time.monotonic()
    with pytest.raises(ModelUnavailable) as err:
        background.load_birefnet(
            ModelSource("birefnet-general", path=tmp_path, filename="birefnet-general.onnx"),
            SimpleNamespace(device=CPU))
    assert time.monotonic() - start < 1.0
    assert err.value.code == "FAILED_PRECONDITION"
    assert "birefnet-general.onnx" in err.value.message and str(tmp_path) in err.value.message
    # Without a configured folder the default rembg locations are searched, still without downloading.
    with pytest.raises(ModelUnavailable, match="nowhere"):
        background.load_birefnet(ModelSource("birefnet-general", repo="rembg/birefnet-general",
                                             filename="birefnet-general.onnx"), SimpleNamespace(device=CPU))


# -- CLIPSeg -----------------------------------------------------------------------------------
def test_clipseg_mask_has_the_input_size(models):
    from paletta_server.engines import segment

    image = photo(150, 84)
    mask, coverage = segment.segment(models["clipseg"], image, "the sky", threshold=0.5, dilate=2, feather=3)
    assert mask.mode == "L" and mask.size == (150, 84) and 0.0 <= coverage <= 1.0
    assert segment.segment(models["clipseg"], image, "the sky", threshold=0.0)[1] == 1.0
    _, none = segment.segment(models["clipseg"], image, "the sky", threshold=1.0)
    assert none == 0.0


def test_mask_threshold_dilate_and_feather():
    from paletta_server.engines import segment

    prob = np.zeros((50, 60), dtype=np.float32)
    prob[25, 30] = 0.9
    prob[5, 5] = 0.3
    prob_img = Image.fromarray(prob, mode="F")
    hard = np.asarray(segment.make_mask(prob_img, 0.5))
    assert hard.sum() // 255 == 1 and hard[25, 30] == 255 and hard[5, 5] == 0
    grown = np.asarray(segment.make_mask(prob_img, 0.5, dilate=4))
    assert grown[25, 34] == 255 and grown[25, 35] == 0 and grown[21, 30] == 255
    soft = np.asarray(segment.make_mask(prob_img, 0.5, dilate=4, feather=3))
    assert soft.shape == (50, 60) and 0 < soft[25, 37] < 255


# -- DETR / OWLv2 --------------------------------------------------------------------------------
def test_detr_boxes_are_in_original_pixels(models):
    from paletta_server.engines import detect
    from paletta_server.engines.tiny.vision import COCO_LABELS

    for width, height in ((160, 90), (90, 160)):
        boxes = detect.detect(models["detr-resnet-50"], photo(width, height), threshold=0.0)
        assert 0 < len(boxes) <= 12
        scores = [b.score for b in boxes]
        assert scores == sorted(scores, reverse=True)
        for b in boxes:
            assert b.label in COCO_LABELS and b.label != "N/A"
            assert 0 <= b.x_min < b.x_max <= width and 0 <= b.y_min < b.y_max <= height
        # The tiny DETR predicts boxes near the centre: their centres scale with the original size.
        cx = np.mean([(b.x_min + b.x_max) / 2 for b in boxes])
        cy = np.mean([(b.y_min + b.y_max) / 2 for b in boxes])
        assert abs(cx - width / 2) < width * 0.2 and abs(cy - height / 2) < height * 0.2
    assert detect.detect(models["detr-resnet-50"], photo(), threshold=1.0) == []


@pytest.mark.parametrize("width, height", [(160, 90), (90, 160), (120, 120), (162, 102)])
def test_owlv2_boxes_use_the_padded_square_and_stay_in_the_image(models, width, height):
    from paletta_server.engines import detect

    boxes = detect.ground(models["owlv2"], photo(width, height), ["a dragon", "a cat"], threshold=0.0)
    # The tiny OWLv2 (heads near zero) predicts each 16-px patch's prior box of the 64-px padded
    # square: side/4 wide, centred on the patch's far corner. In original pixels that is a grid over
    # the padded square side = max(w, h); boxes with less than a pixel of width or height in the
    # image are dropped (at 162x102 a row keeps 0.75 px), others clipped.
    side = max(width, height)
    cell = side / 4
    expected = []
    for i in range(4):
        for j in range(4):
            x0, y0 = (i + 0.5) * cell, (j + 0.5) * cell
            x1, y1 = min(x0 + cell, width), min(y0 + cell, height)
            if x1 - x0 >= 1 and y1 - y0 >= 1:
                expected.append((x0, y0, x1, y1))
    assert len(boxes) == len(expected)
    for b in boxes:
        assert b.label in ("a dragon", "a cat")
        assert 0 <= b.x_min < b.x_max <= width and 0 <= b.y_min < b.y_max <= height
        got = (b.x_min, b.y_min, b.x_max, b.y_max)
        assert min(max(abs(g - e) for g, e in zip(got, box, strict=True)) for box in expected) < 1.0, got


# -- BLIP / BLIP-2 -------------------------------------------------------------------------------
def test_blip_captions(models):
    from paletta_server.engines import caption

    fast = caption.caption(models["blip-large"], photo(), max_tokens=12)
    assert isinstance(fast, str) and len(fast.split()) <= 12
    deep = caption.caption(models["blip2-opt-2.7b"], photo(), max_tokens=30, deep=True)
    assert isinstance(deep, str) and deep and "Question:" not in deep
    assert caption.caption(models["blip-large"], photo(), max_tokens=12) == fast  # greedy/beam: stable


def test_caption_checks_cancellation_per_token(models):
    from paletta_server.engines import caption

    calls = []

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        caption.caption(models["blip2-opt-2.7b"], photo(), max_tokens=30, deep=True, check=check)


# -- Qwen2.5 expand ------------------------------------------------------------------------------
def test_expand_is_deterministic_per_seed_and_leaves_global_rng(models):
    import torch

    from paletta_server.engines import prompt

    rewriter = models["qwen2.5-1.5b-instruct"]
    state = torch.get_rng_state()
    a = prompt.expand(rewriter, "  knight in forest ", seed=7, max_tokens=24)
    assert torch.equal(state, torch.get_rng_state())
    assert a == prompt.expand(rewriter, "knight in forest", seed=7, max_tokens=24)
    assert a == a.strip() and a
    others = {prompt.expand(rewriter, "knight in forest", seed=s, max_tokens=24) for s in (8, 9, 10)}
    assert others - {a}, "another seed gives another expansion"


def test_expand_uses_the_chat_template(models):
    tok = models["qwen2.5-1.5b-instruct"].tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text


def test_missing_transformers_folder_is_model_unavailable(tmp_path):
    config = load_config(tmp_path, env={}, profile="fast")
    registry = ModelRegistry(config, env={"PALETTA_MODEL_CLIPSEG": str(tmp_path / "absent")})
    manager = ResidencyManager(registry, CPU, lambda used: 1 << 40)
    with pytest.raises(ModelUnavailable, match="PALETTA_MODEL_CLIPSEG"):
        manager.ensure_resident("clipseg")
    (tmp_path / "empty").mkdir()
    registry = ModelRegistry(config, env={"PALETTA_MODEL_OWLV2": str(tmp_path / "empty")})
    with pytest.raises(ModelUnavailable):
        ResidencyManager(registry, CPU, lambda used: 1 << 40).ensure_resident("owlv2")
