"""Content-addressed asset store: ``assets/{sha256}``, written atomically, names validated.

Files live at ``<data>/assets/<first two hex>/<sha256>`` with a JSON sidecar holding the
media type and size, so an asset never changes once written and survives any crash.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from paletta_server.errors import FieldViolation, InvalidArgument, NotFound, ResourceExhausted, invalid
from paletta_server.storage.png import encode_png

_NAME = re.compile(r"^assets/([0-9a-f]{64})$")
_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# (signature test on the first 12 bytes, the format's own parser) for each format in _FORMATS.
_PARSERS: tuple[tuple[Callable[[bytes], bool], Callable[[BinaryIO], ImageFile.ImageFile]], ...] = (
    (lambda head: head.startswith(b"\x89PNG\r\n\x1a\n"), PngImagePlugin.PngImageFile),
    (lambda head: head.startswith(b"\xff\xd8\xff"), JpegImagePlugin.JpegImageFile),
    (lambda head: head[:4] == b"RIFF" and head[8:12] == b"WEBP", WebPImagePlugin.WebPImageFile),
)
# 8 bits per channel; 16-bit and float images (I;16, I, F) are refused rather than silently clipped.
SUPPORTED_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK"}
FULL_DECODE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class AssetInfo:
    name: str
    mime: str
    width: int
    height: int
    size_bytes: int


def parse_asset_name(name: str, field_name: str = "name") -> str:
    """Return the sha256 of a well-formed asset name, or raise InvalidArgument naming the field."""
    match = _NAME.match(name or "")
    if not match:
        raise invalid(field_name, f"{name!r} is not an asset name of the form assets/{{sha256}}")
    return match.group(1)


def _format_name(data: bytes) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                return f" {img.format}"
    except Exception:  # only for the message: whatever it is, it is not one we take
        return ""


def open_header(fh: BinaryIO, field_name: str) -> ImageFile.ImageFile:
    """Open a PNG, JPEG or WebP by its signature with that format's parser, reading the header only.

    ``Image.open`` would first apply Pillow's process-wide decompression-bomb limit (178,956,970
    pixels; an error past twice that), so its error, not the server's limit, would answer.
    """
    head = fh.read(12)
    fh.seek(0)
    for matches, parser in _PARSERS:
        if matches(head):
            return parser(fh)
    raise invalid(field_name, f"unsupported image format{_format_name(head + fh.read())}; use PNG, JPEG or WebP")


def check_pixels(width: int, height: int, max_pixels: int, field_name: str) -> None:
    if width <= 0 or height <= 0:
        raise invalid(field_name, f"image of {width}x{height} has no pixels")
    if width * height > max_pixels:
        # A plain field violation, like every other bad input: capabilities gather these into one
        # BadRequest, and GetStatus.max_image_pixels tells clients the number beforehand.
        raise invalid(field_name, f"image of {width}x{height} ({width * height} pixels) exceeds this server's "
                                  f"limit of {max_pixels} pixels (max_image_pixels)")


def probe_image(data: bytes, max_pixels: int, field_name: str = "data") -> tuple[str, int, int]:
    """Check that bytes are a whole PNG/JPEG/WebP within the pixel limit; return (mime, w, h).

    The header is read first, so a decompression bomb (huge declared size) is refused before
    any pixel is decoded. Images are then decoded in full, except PNGs over FULL_DECODE_BYTES,
    which are checked chunk by chunk (every CRC) so large uploads stay fast; should such a file
    still hold a broken pixel stream, ``open_image`` reports it as INVALID_ARGUMENT when used.
    """
    try:
        with open_header(io.BytesIO(data), field_name) as img:
            fmt, (width, height), mode = img.format, img.size, img.mode
            if mode not in SUPPORTED_MODES:
                raise invalid(field_name, f"unsupported image mode {mode}; use 8-bit grayscale, palette, RGB or RGBA")
            check_pixels(width, height, max_pixels, field_name)
            if fmt == "PNG" and len(data) > FULL_DECODE_BYTES:
                img.verify()
            else:
                img.load()
    except InvalidArgument:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise invalid(field_name, f"not a decodable image: {exc}") from exc
    return _FORMATS[fmt], width, height


class AssetStore:
    def __init__(self, root: Path, max_bytes: int, max_pixels: int):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Partial files of uploads or writes cut short by a crash; finished assets are never temporary.
        for orphan in [*self.root.glob(".upload-*"), *self.root.glob("*/.tmp-*")]:
            orphan.unlink(missing_ok=True)
        # The sidecar is written before its asset, so a crash between the two leaves a sidecar
        # describing nothing.
        for sidecar in self.root.glob("*/*.json"):
            if not sidecar.with_suffix("").exists():
                sidecar.unlink(missing_ok=True)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def _path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def put_image_bytes(self, data: bytes, field_name: str = "data") -> AssetInfo:
        """Validate and store encoded image bytes (an upload or an inline ImageRef)."""
        if len(data) > self.max_bytes:
            raise ResourceExhausted(
                f"{field_name}: {len(data)} bytes exceeds the upload limit of {self.max_bytes} bytes",
                reason="ASSET_TOO_LARGE", violations=[FieldViolation(field_name, "exceeds the upload size limit")],
            )
        if not data:
            raise invalid(field_name, "no bytes were sent")
        mime, width, height = probe_image(data, self.max_pixels, field_name)
        return self._write(data, mime, width, height)

    def begin_upload(self) -> AssetUpload:
        """A streaming upload: chunks are hashed and written as they arrive, checked at commit."""
        return AssetUpload(self)

    def put_image(self, image: Image.Image, parameters: dict | None = None) -> AssetInfo:
        """Store a PIL image as PNG, with effective parameters in a 'parameters' text chunk."""
        text = {"parameters": json.dumps(parameters, sort_keys=True)} if parameters is not None else {}
        return self._write(encode_png(image, text), "image/png", image.width, image.height)

    def _write(self, data: bytes, mime: str, width: int, height: int) -> AssetInfo:
        digest = hashlib.sha256(data).hexdigest()
        info = AssetInfo(f"assets/{digest}", mime, width, height, len(data))
        path = self._path(digest)
        # Both checked: an asset whose sidecar was lost is made whole by storing it again.
        if not path.exists() or not path.with_suffix(".json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path.with_suffix(".json"), json.dumps(asdict(info)).encode())
            _atomic_write(path, data)
        return info

    def get(self, name: str, field_name: str = "name") -> AssetInfo:
        digest = parse_asset_name(name, field_name)
        meta = self._path(digest).with_suffix(".json")
        if not self._path(digest).exists() or not meta.exists():
            raise NotFound(f"{field_name}: asset {name} does not exist", reason="ASSET_NOT_FOUND",
                           violations=[FieldViolation(field_name, f"asset {name} does not exist")])
        return AssetInfo(**json.loads(meta.read_text()))

    def path(self, name: str, field_name: str = "name") -> Path:
        self.get(name, field_name)
        return self._path(parse_asset_name(name, field_name))

    def open_image(self, name: str, field_name: str = "image") -> Image.Image:
        """The decoded image: RGB, RGBA or L (palette, CMYK and 1-bit images are converted)."""
        try:
            # Stored assets were checked when they came in (or are the server's own outputs), so
            # Pillow's bomb limit has no say here either.
            with self.path(name, field_name).open("rb") as fh, open_header(fh, field_name) as img:
                img.load()
                if img.mode in ("RGB", "RGBA", "L"):
                    return img.copy()  # detached from the file (cheap next to the decode)
                has_alpha = "A" in img.mode or "transparency" in img.info
                return img.convert("RGBA" if has_alpha else "RGB")
        except (OSError, SyntaxError, ValueError) as exc:  # a broken pixel stream behind valid chunks
            raise invalid(field_name, f"asset {name} is not a decodable image: {exc}") from exc


class AssetUpload:
    """Receives an upload chunk by chunk into a temporary file, so hashing and disk writes overlap
    the network; ``commit`` validates the image and moves it into place atomically."""

    def __init__(self, store: AssetStore):
        self.store = store
        self.size = 0
        self._hash = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=store.root, prefix=".upload-")
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(tmp)

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.store.max_bytes:
            raise ResourceExhausted(
                f"data: upload exceeds the limit of {self.store.max_bytes} bytes", reason="ASSET_TOO_LARGE",
                violations=[FieldViolation("data", f"exceeds the upload limit of {self.store.max_bytes} bytes")])
        self._hash.update(data)
        self._file.write(data)

    def commit(self, field_name: str = "data") -> AssetInfo:
        try:
            self._file.flush()
            if not self.size:
                raise invalid(field_name, "no bytes were sent")
            mime, width, height = probe_image(self._tmp.read_bytes(), self.store.max_pixels, field_name)
            digest = self._hash.hexdigest()
            info = AssetInfo(f"assets/{digest}", mime, width, height, self.size)
            path = self.store._path(digest)
            if not path.exists() or not path.with_suffix(".json").exists():
                os.fsync(self._file.fileno())
                path.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(path.with_suffix(".json"), json.dumps(asdict(info)).encode())
                os.replace(self._tmp, path)
            return info
        finally:
            self.abort()

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
