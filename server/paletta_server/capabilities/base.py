"""What a capability is: validate a request, name its models, run it.

A capability module (``capabilities/<name>.py``) exports one ``CAPABILITY`` built from the
pieces below. The api layer turns an RPC into ``submit(capability, request)``; the device
worker calls ``capability.run(request, ctx)`` with a RunContext. Capabilities never see gRPC.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf.message import Message

from paletta.v1 import image_pb2

if TYPE_CHECKING:
    from PIL import Image

    from paletta_server.config import Config
    from paletta_server.engines.common import Device
    from paletta_server.models.profiles import Profile
    from paletta_server.models.styles import StyleRegistry
    from paletta_server.storage import AssetInfo, AssetStore

NORMAL = image_pb2.PRIORITY_NORMAL
HIGH = image_pb2.PRIORITY_HIGH


@dataclass
class PrepareContext:
    """What validation may use: runs on the request path, before the job exists."""

    assets: AssetStore
    profile: Profile
    config: Config
    styles: StyleRegistry


class RunContext(Protocol):
    """What a running job may use (implemented by jobs/runner.py)."""

    assets: AssetStore
    profile: Profile
    device: Device
    config: Config
    styles: StyleRegistry
    job_name: str

    def model(self, key: str) -> Any:
        """The loaded model for a registry key; loads it (with `loading` events) if needed."""

    def progress(self, step: int, total: int, stage: str) -> None: ...

    def use_models(self, keys: list[str]) -> None:
        """Pin these models (and only these) against eviction; for jobs whose steps change models."""

    def preview(self, image: Image.Image, step: int) -> None:
        """Send a preview (downscaled to 256 px and JPEG-encoded here)."""

    def check_cancelled(self) -> None:
        """Raise JobCancelled when the job was cancelled."""

    def open_image(self, asset_name: str) -> Image.Image: ...

    def emit_output(self, image: Image.Image | None, *, parameters: dict, seed: int = 0,
                    result: Message | None = None) -> AssetInfo | None:
        """Store an output image (PNG with parameters) and send the `output` event."""


@dataclass(frozen=True)
class Capability:
    name: str
    request_type: type[Message]
    # Validate (raise InvalidArgument naming fields) and normalise the request: inline images
    # become assets, defaults are filled in. Runs in a thread on the request path.
    prepare: Callable[[Any, PrepareContext], Any]
    # Registry keys the job needs, the main one first (used for scheduling affinity).
    models: Callable[[Any, Profile], list[str]]
    run: Callable[[Any, RunContext], None]
    default_priority: int = NORMAL
