"""PNG encoders on realistic 1024² outputs: size and time, median of N (figures, not timed tests).

``python -m tests.bench.png [--size 1024 --runs 5]`` prints a table of every encoder importable
here (Pillow levels 0/1/3/6, OpenCV, and, when installed, imagecodecs, pyspng, fpng, and a
numpy-filtered PNG deflated by zlib-ng / isal / libdeflate) over three images: noise-like (what
random-weight FLUX produces: uniform noise), a smooth gradient, and a photo-like image (1/f
"natural" texture with edges and grain). Every encoding is decoded with Pillow and compared to
the source pixels, so a row means a valid, lossless PNG.

``measure(images, runs) -> list[dict]`` returns the same rows for other scripts (tests/bench/gpu.py
times the winner on the real output of the GPU run).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

Encoder = Callable[[np.ndarray], bytes]


def noise_image(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def gradient_image(size: int) -> np.ndarray:
    x = np.linspace(0, 255, size, dtype=np.float32)
    r = np.tile(x, (size, 1))
    g = r.T
    b = np.full((size, size), 90, np.float32) + 40 * np.sin(np.linspace(0, 3 * np.pi, size))[None, :]
    return np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)


def photo_like_image(size: int, seed: int = 0) -> np.ndarray:
    """1/f noise (the spectrum of natural images) at twice the size, a few hard-edged shapes, downscaled
    with LANCZOS like a camera pipeline would, then sensor grain."""
    rng = np.random.default_rng(seed)
    big = size * 2
    fy = np.fft.fftfreq(big)[:, None]
    fx = np.fft.rfftfreq(big)[None, :]
    falloff = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / big) ** 1.1
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=falloff.shape) + 1j * rng.normal(size=falloff.shape)) * falloff
        field = np.fft.irfft2(spectrum, s=(big, big))
        channels.append(field)
    mix = np.array([[1.0, 0.6, 0.3], [0.6, 1.0, 0.5], [0.3, 0.5, 1.0]])
    rgb = np.stack(channels, axis=-1) @ mix
    rgb = (rgb - rgb.mean()) / (rgb.std() * 4) * 255 + 120
    yy, xx = np.mgrid[0:big, 0:big]
    for _ in range(6):  # objects with edges
        cy, cx, rad = rng.integers(0, big, 2).tolist() + [int(rng.integers(big // 16, big // 5))]
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < rad**2
        rgb[inside] = rgb[inside] * 0.5 + rng.integers(0, 256, 3) * 0.5
    image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").resize((size, size), Image.Resampling.LANCZOS)
    grain = rng.normal(0, 2.0, (size, size, 3))
    return (np.asarray(image, np.float32) + grain).clip(0, 255).astype(np.uint8)


def images(size: int = 1024) -> dict[str, np.ndarray]:
    return {"noise-like": noise_image(size), "smooth gradient": gradient_image(size),
            "photo-like": photo_like_image(size)}


# -- encoders --------------------------------------------------------------------------------------
def _pillow(level: int) -> Encoder:
    def encode(pixels: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=level)
        return buf.getvalue()

    return encode


def _chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _filtered_rows(pixels: np.ndarray, kind: str) -> bytes:
    """PNG scanlines with one filter for every row: "none" (0), "sub" (1) or "up" (2)."""
    rows = pixels.reshape(pixels.shape[0], -1)
    bpp = 1 if pixels.ndim == 2 else pixels.shape[2]
    if kind == "none":
        out, code = rows, 0
    elif kind == "sub":
        out, code = rows.copy(), 1
        out[:, bpp:] -= rows[:, :-bpp]
    else:
        out, code = rows.copy(), 2
        out[1:] -= rows[:-1]
    framed = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    framed[:, 0] = code
    framed[:, 1:] = out
    return framed.tobytes()


def _raw_png(compress: Callable[[bytes], bytes], kind: str) -> Encoder:
    def encode(pixels: np.ndarray) -> bytes:
        height, width = pixels.shape[:2]
        color = {1: 0, 2: 4, 3: 2, 4: 6}[1 if pixels.ndim == 2 else pixels.shape[2]]
        ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, color, 0, 0, 0])
        return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", compress(_filtered_rows(pixels, kind)))
                + _chunk(b"IEND", b""))

    return encode


def encoders() -> dict[str, Encoder]:
    found: dict[str, Encoder] = {f"Pillow level {lv}": _pillow(lv) for lv in (0, 1, 3, 6)}
    try:
        import cv2

        def opencv(level: int, strategy: int | None = None) -> Encoder:
            params = [cv2.IMWRITE_PNG_COMPRESSION, level]
            if strategy is not None:
                params += [cv2.IMWRITE_PNG_STRATEGY, strategy]

            def encode(pixels: np.ndarray) -> bytes:
                bgr = pixels[..., ::-1] if pixels.ndim == 3 else pixels
                ok, data = cv2.imencode(".png", np.ascontiguousarray(bgr), params)
                assert ok
                return data.tobytes()

            return encode

        found["OpenCV level 1"] = opencv(1)
        found["OpenCV level 1 RLE"] = opencv(1, cv2.IMWRITE_PNG_STRATEGY_RLE)
        found["OpenCV level 3"] = opencv(3)
    except ImportError:
        pass
    try:
        import imagecodecs

        found["imagecodecs png level 1"] = lambda p: imagecodecs.png_encode(p, level=1)
        found["imagecodecs png 1 RLE SUB"] = lambda p: imagecodecs.png_encode(p, level=1, strategy=3, filter=16)
        found["imagecodecs spng level 1"] = lambda p: imagecodecs.spng_encode(p, level=1)
    except ImportError:
        pass
    try:
        import pyspng

        found["pyspng level 1"] = lambda p: pyspng.encode(p, compress_level=1)
    except ImportError:
        pass
    try:
        import fpng

        found["fpng"] = lambda p: fpng.from_ndarray(np.ascontiguousarray(p))
    except ImportError:
        pass
    from paletta_server.storage.png import encode_png

    found["paletta encode_png"] = lambda p: encode_png(Image.fromarray(p), {"parameters": "{}"})
    found["numpy up + zlib 1"] = _raw_png(lambda b: zlib.compress(b, 1), "up")
    try:
        from zlib_ng import zlib_ng

        found["numpy up + zlib-ng 1"] = _raw_png(lambda b: zlib_ng.compress(b, 1), "up")
        found["numpy sub + zlib-ng 1"] = _raw_png(lambda b: zlib_ng.compress(b, 1), "sub")
    except ImportError:
        pass
    try:
        from isal import isal_zlib

        found["numpy up + isal 0"] = _raw_png(lambda b: isal_zlib.compress(b, 0), "up")
        found["numpy up + isal 1"] = _raw_png(lambda b: isal_zlib.compress(b, 1), "up")
    except ImportError:
        pass
    try:
        import deflate

        found["numpy up + libdeflate 1"] = _raw_png(lambda b: deflate.zlib_compress(b, 1), "up")
    except ImportError:
        pass
    return found


def measure(pictures: dict[str, np.ndarray], runs: int = 5, only: list[str] | None = None) -> list[dict]:
    """[{encoder, image, ms (median), bytes}] for every encoder and image; each output checked lossless."""
    rows = []
    for name, encode in encoders().items():
        if only and name not in only:
            continue
        for label, pixels in pictures.items():
            data = encode(pixels)
            with Image.open(io.BytesIO(data)) as back:
                if not np.array_equal(np.asarray(back.convert("RGB")), pixels):
                    raise AssertionError(f"{name} is not lossless on {label}")
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                encode(pixels)
                times.append(time.perf_counter() - start)
            rows.append({"encoder": name, "image": label, "ms": statistics.median(times) * 1000, "bytes": len(data)})
    return rows


def table(rows: list[dict]) -> str:
    labels = list(dict.fromkeys(r["image"] for r in rows))
    lines = ["| encoder | " + " | ".join(f"{label}: ms / MB" for label in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for name in dict.fromkeys(r["encoder"] for r in rows):
        cells = {r["image"]: r for r in rows if r["encoder"] == name}
        lines.append(f"| {name} | " + " | ".join(
            f"{cells[label]['ms']:.1f} / {cells[label]['bytes'] / 1e6:.2f}" for label in labels) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"PNG encode, {args.size}x{args.size} RGB, median of {args.runs} (time ms / size MB):")
    print(table(measure(images(args.size), args.runs)))
