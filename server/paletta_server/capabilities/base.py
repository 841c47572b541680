"""What a capability is: one declaration, the only place that names it.

A capability module (``capabilities/<name>.py``) exports ``CAPABILITY`` (or ``CAPABILITIES``).
Everything else is derived from the declarations: the RPCs that serve them (the contract's
methods whose request type is the capability's, api/capabilities.py), the ``JobSpec`` field a
job stores (named like the capability), which capabilities use a model (``model_keys``,
SystemService.ListModels), the pipeline step kinds and their chaining (``chains``, ``makes``),
and the tables the tests run over. The api layer turns an RPC into a job; the device worker
calls ``capability.run(request, ctx)`` with a RunContext. Capabilities never see gRPC.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf.message import Message

from paletta.v1 import job_options_pb2, job_spec_pb2

if TYPE_CHECKING:
    from PIL import Image

    from paletta_server.config import Config
    from paletta_server.models.profiles import Profile
    from paletta_server.models.styles import StyleRegistry
    from paletta_server.models.types import Device
    from paletta_server.storage import AssetInfo, AssetStore

NORMAL = job_options_pb2.PRIORITY_NORMAL
HIGH = job_options_pb2.PRIORITY_HIGH


@dataclass
class PrepareContext:
    """What validation may use: runs on the request path, before the job exists."""

    assets: AssetStore
    profile: Profile
    config: Config
    styles: StyleRegistry


@dataclass(frozen=True)
class OutputHandle:
    """What ``emit_output`` returns: the stored asset when it was stored at once (``store_now``)."""

    asset: AssetInfo | None = None


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
                    result: Message | None = None, store_now: bool = False) -> OutputHandle:
        """Send an output: the image is stored (PNG with parameters) off the device thread, unless
        ``store_now`` asks for the asset at once; ``result`` is a typed result message."""


@dataclass(frozen=True)
class Capability:
    # The name: Job.capability, the JobSpec field, the pipeline step kind.
    name: str
    request_type: type[Message]
    # Validate (raise InvalidArgument naming fields) and normalise the request: inline images
    # become assets, defaults are filled in. Runs in a thread on the request path.
    prepare: Callable[[Any, PrepareContext], Any]
    # Registry keys this job needs, the main one first (used for scheduling affinity).
    models: Callable[[Any, Profile], list[str]]
    run: Callable[[Any, RunContext], None]
    # Every registry key the capability may use (what ListModels shows as a model's users).
    model_keys: tuple[str, ...] = ()
    # The typed result message its outputs carry in JobOutput.result, if any.
    result_type: type[Message] | None = None
    # In a pipeline: ImageRef fields that, when unset, take the current "image" or "mask".
    chains: Mapping[str, str] = field(default_factory=dict)
    # In a pipeline: what its first output becomes, "image", "mask", or "" (nothing chains).
    makes: str = "image"
    # Fields whose default is the size of a chained input (ControlNet's width / height): prepare fills
    # them from the input; in a pipeline step whose input is chained they stay unset until it runs.
    input_sized: tuple[str, ...] = ()
    # In a pipeline, whether its image output is a cut-out (transparent pixels, which a following
    # inpaint with no mask to chain repaints): "makes" (background removal), "keeps" its input's
    # (upscale), or "" (an opaque image).
    cutout: str = ""
    default_priority: int = NORMAL

    def spec_of(self, request: Message) -> job_spec_pb2.JobSpec:
        """The JobSpec a job stores: the request without its job options."""
        spec = job_spec_pb2.JobSpec()
        stored = getattr(spec, self.name)
        stored.CopyFrom(request)
        stored.ClearField("options")
        return spec

    def request_of(self, spec: job_spec_pb2.JobSpec) -> Any:
        return getattr(spec, self.name)
