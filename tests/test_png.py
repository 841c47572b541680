"""storage/png.py: lossless for L / RGB / RGBA (fast path) and other modes (Pillow), text chunks intact."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from paletta_server.storage import png
from tests.bench.png import noise_image, photo_like_image

PARAMETERS = json.dumps({"prompt": "a knight", "seed": 7, "steps": 4}, sort_keys=True)


def _image(mode: str, size: tuple[int, int] = (67, 45)) -> Image.Image:
    rng = np.random.default_rng(1)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture(params=["fast", "pillow"])
def backend(request, monkeypatch):
    if request.param == "pillow":
        monkeypatch.setattr(png, "isal_zlib", None)
    elif png.isal_zlib is None:
        pytest.skip("isal is not installed")
    return request.param


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_pixels_round_trip_exactly(mode, backend):
    image = _image(mode)
    back = _decode(png.encode_png(image, {"parameters": PARAMETERS}))
    assert back.format == "PNG"
    assert back.mode == mode
    assert back.size == image.size
    assert np.array_equal(np.asarray(back), np.asarray(image))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_parameters_text_chunk_reads_back(mode, backend):
    back = _decode(png.encode_png(_image(mode), {"parameters": PARAMETERS, "Software": "paletta"}))
    assert back.text["parameters"] == PARAMETERS
    assert json.loads(back.text["parameters"])["seed"] == 7
    assert back.text["Software"] == "paletta"


def test_non_latin1_text_uses_itxt_and_reads_back(backend):
    value = json.dumps({"prompt": "ночной город 夜"}, ensure_ascii=False)
    data = png.encode_png(_image("RGB"), {"parameters": value})
    assert _decode(data).text["parameters"] == value
    if backend == "fast":
        assert b"iTXt" in data and b"tEXt" not in data


def test_no_text_gives_a_plain_png(backend):
    back = _decode(png.encode_png(_image("RGB"), {}))
    assert back.text == {}


def test_other_modes_fall_back_to_pillow_losslessly():
    image = _image("LA")
    back = _decode(png.encode_png(image, {"parameters": PARAMETERS}))
    assert back.mode == "LA"
    assert np.array_equal(np.asarray(back), np.asarray(image))
    assert back.text["parameters"] == PARAMETERS


def test_one_row_and_one_column_images(backend):
    for size in ((1, 1), (1, 9), (9, 1)):
        image = _image("RGB", size)
        assert np.array_equal(np.asarray(_decode(png.encode_png(image, {}))), np.asarray(image))


def test_large_outputs_split_image_data_and_stay_exact(monkeypatch, backend):
    monkeypatch.setattr(png, "IDAT_BYTES", 4096)
    image = Image.fromarray(noise_image(128), "RGB")
    data = png.encode_png(image, {"parameters": PARAMETERS})
    if backend == "fast":
        assert data.count(b"IDAT") > 10
    assert np.array_equal(np.asarray(_decode(data)), np.asarray(image))


def test_fast_path_is_as_small_as_pillow_on_a_photo_like_image():
    if png.isal_zlib is None:
        pytest.skip("isal is not installed")
    image = Image.fromarray(photo_like_image(256), "RGB")
    fast = png.encode_png(image, {})
    pillow = png._pillow_png(image, {})
    assert len(fast) <= len(pillow) * 1.05


def test_bad_keyword_is_refused(backend):
    if backend == "pillow":
        pytest.skip("Pillow's own rules apply")
    with pytest.raises(ValueError):
        png.encode_png(_image("L"), {"": "x"})
