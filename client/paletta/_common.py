"""Pieces shared by the sync and async clients: input coercion, enums, small formatting."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeAlias

from PIL import Image

from paletta.v1 import (
    asset_service_pb2,
    caption_pb2,
    control_pb2,
    image_pb2,
    job_options_pb2,
    job_pb2,
)

DEFAULT_ADDRESS = "127.0.0.1:50051"
UPLOAD_CHUNK_BYTES = 256 * 1024
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | Image.Image | image_pb2.Asset | image_pb2.ImageRef"
"""An image argument: a file path, encoded bytes, a PIL image, an asset ("assets/…" or Asset)."""

StyleInput: TypeAlias = "str | tuple[str, float | None] | image_pb2.StyleSelection"
"""A style: "tarot", "tarot:0.8", ("tarot", 0.8) or a StyleSelection."""

StylesInput: TypeAlias = "Iterable[StyleInput] | Mapping[str, float | None] | None"


class _Named(Protocol):
    @property
    def name(self) -> str: ...


JobRef: TypeAlias = "str | job_pb2.Job | _Named"
"""A job: its name ("jobs/…"), a Job, or a job handle."""


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the bearer token, or none."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def read_root_cert(tls_root_cert: str | os.PathLike[str] | bytes | None) -> bytes | None:
    """PEM bytes of a root certificate given as a path or as the bytes themselves."""
    if tls_root_cert is None or isinstance(tls_root_cert, bytes):
        return tls_root_cert
    return Path(tls_root_cert).read_bytes()


@dataclass(frozen=True)
class PreparedImage:
    """An image argument resolved to either an asset name or bytes still to upload."""

    asset: str | None = None
    data: bytes | None = None

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data or b"").hexdigest()


def prepare_image(value: ImageInput) -> PreparedImage:
    """Resolve an image argument without any I/O on the network.

    Strings starting with ``assets/`` are asset names; other strings and paths are files.
    """
    if isinstance(value, image_pb2.ImageRef):
        if value.WhichOneof("source") == "asset":
            return PreparedImage(asset=value.asset)
        return PreparedImage(data=value.inline)
    if isinstance(value, image_pb2.Asset):
        return PreparedImage(asset=value.name)
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return PreparedImage(data=buf.getvalue())
    if isinstance(value, bytes | bytearray | memoryview):
        return PreparedImage(data=bytes(value))
    if isinstance(value, str) and value.startswith("assets/"):
        return PreparedImage(asset=value)
    if isinstance(value, str | os.PathLike):
        return PreparedImage(data=Path(value).read_bytes())
    raise TypeError(f"cannot use {type(value).__name__} as an image: give a path, bytes, a PIL image or an asset")


def upload_requests(data: bytes, chunk: int = UPLOAD_CHUNK_BYTES) -> Iterator[asset_service_pb2.UploadAssetRequest]:
    """Split bytes into UploadAssetRequest chunks (always at least one)."""
    view = memoryview(data)
    for start in range(0, max(len(data), 1), chunk):
        yield asset_service_pb2.UploadAssetRequest(data=bytes(view[start : start + chunk]))


def asset_name(value: str | image_pb2.Asset) -> str:
    """The resource name of an asset given by name or as an Asset."""
    return value.name if isinstance(value, image_pb2.Asset) else value


def job_name(value: JobRef) -> str:
    """The resource name of a job given by name, as a Job, or as a job handle."""
    if isinstance(value, str):
        return value
    return str(value.name)


def enum_value(enum: Any, prefix: str, value: int | str | None) -> int:
    """Coerce "high", "PRIORITY_HIGH" or an enum int to the enum's int (None → 0)."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    name = value.strip().upper().replace("-", "_")
    if not name.startswith(prefix):
        name = prefix + name
    try:
        return int(enum.Value(name))
    except ValueError:
        names = [n for n in enum.keys() if not n.endswith("UNSPECIFIED")]  # noqa: SIM118 - enum wrapper
        choices = ", ".join(n.removeprefix(prefix).lower() for n in names)
        raise ValueError(f"unknown value {value!r}; choose one of {choices}") from None


def priority(value: int | str | None) -> int:
    return enum_value(job_options_pb2.Priority, "PRIORITY_", value)


def upscaler(value: int | str | None) -> int:
    return enum_value(image_pb2.Upscaler, "UPSCALER_", value)


def control_type(value: int | str | None) -> int:
    return enum_value(control_pb2.ControlType, "CONTROL_TYPE_", value)


def preprocess(value: int | str | None) -> int:
    return enum_value(control_pb2.Preprocess, "PREPROCESS_", value)


def caption_depth(value: int | str | None) -> int:
    return enum_value(caption_pb2.CaptionDepth, "CAPTION_DEPTH_", value)


def job_state(value: int | str) -> int:
    return enum_value(job_pb2.JobState, "JOB_STATE_", value)


def state_label(value: int) -> str:
    """ "succeeded" for JOB_STATE_SUCCEEDED."""
    return job_pb2.JobState.Name(value).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]  # an int


def parse_style(value: StyleInput) -> image_pb2.StyleSelection:
    """A StyleSelection from "name", "name:weight", (name, weight) or a StyleSelection."""
    if isinstance(value, image_pb2.StyleSelection):
        return value
    if isinstance(value, tuple):
        name, weight = value
    else:
        name, sep, raw = value.partition(":")
        try:
            weight = float(raw) if sep else None
        except ValueError:
            raise ValueError(f"style {value!r}: weight {raw!r} is not a number") from None
    selection = image_pb2.StyleSelection(name=name.strip())
    if weight is not None:
        selection.weight = float(weight)
    return selection


def styles(value: StylesInput) -> list[image_pb2.StyleSelection]:
    """StyleSelections from a list of styles or a {name: weight} mapping."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [parse_style((name, weight)) for name, weight in value.items()]
    if isinstance(value, str | image_pb2.StyleSelection):
        return [parse_style(value)]
    return [parse_style(item) for item in value]


def optional_fields(**values: Any) -> dict[str, Any]:
    """Drop the None values so proto3 `optional` fields stay unset."""
    return {key: value for key, value in values.items() if value is not None}


def decode_image(data: bytes) -> Image.Image:
    """Decode downloaded bytes into a loaded PIL image."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def human_bytes(n: int) -> str:
    """Bytes for people: 512 B, 3.4 MiB, 12.50 GiB."""
    if n < 1024:
        return f"{n} B"
    if n < 1024**3:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024**3:.2f} GiB"
