"""Typed values the SDK hands back: job results and progress, as plain dataclasses.

The server's typed output results (``JobOutput.result``) become :class:`Detections`,
:class:`Caption`, :class:`PromptExpansion`, :class:`Segmentation` or :class:`FaceIdentity`; progress and preview
events become :class:`Progress`.

Example::

    detections = client.detect("street.jpg").result()
    for d in detections:
        print(d.label, round(d.score, 2), d.box.width, d.box.height)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeAlias

from PIL import Image

from paletta.v1 import job_pb2, result_pb2


@dataclass(frozen=True)
class Box:
    """An axis-aligned rectangle in the original image's pixel coordinates."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float

    @property
    def width(self) -> float:
        return self.x_max - self.x_min

    @property
    def height(self) -> float:
        return self.y_max - self.y_min


@dataclass(frozen=True)
class Detection:
    """One detected object: a DETR class label or the OWLv2 text query that matched."""

    label: str
    score: float
    box: Box


@dataclass(frozen=True)
class Detections:
    """The result of ``detect`` and ``ground``: detections by descending score.

    Iterable and sized like a list of :class:`Detection`.
    """

    detections: list[Detection]
    image_width: int
    image_height: int

    def __iter__(self) -> Iterator[Detection]:
        return iter(self.detections)

    def __len__(self) -> int:
        return len(self.detections)

    @property
    def labels(self) -> list[str]:
        return [d.label for d in self.detections]


@dataclass(frozen=True)
class Caption:
    """The result of ``caption`` (``objects`` empty) and ``analyze`` (DETR labels, most confident first)."""

    text: str
    objects: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PromptExpansion:
    """The result of ``expand``: the prompt as given and its verbose rewrite."""

    original: str
    expanded: str


@dataclass(frozen=True)
class Segmentation:
    """The result of ``segment``: the mask asset (grayscale PNG, white = selected) and its coverage.

    ``mask`` is an asset name: pass it to ``inpaint`` as the mask, or ``download_image`` it.
    """

    mask: str
    coverage: float


@dataclass(frozen=True)
class FaceIdentity:
    """The face an ``identity`` job took its identity from (the same on every output).

    ``box`` is in the face photo's pixels, ``score`` the detector's confidence; ``face_index``
    counts faces by box area, largest first, of ``faces_found``. ``face_crop`` is the asset name
    of the aligned, parsed face the encoders saw (``download_image`` it to check the crop).
    """

    box: Box
    score: float
    face_index: int
    faces_found: int
    face_crop: str


Result: TypeAlias = Detections | Caption | PromptExpansion | Segmentation | FaceIdentity
"""Any typed job result."""


@dataclass(frozen=True)
class Progress:
    """Where a job is, from its queued, progress and preview events.

    ``stage`` is "queued" (``queue_position`` set), "loading" / "evicting" (``model`` set),
    "denoising", "tiling", "inference" or "pipeline". ``step`` of ``total`` counts within the
    stage. ``variant`` is the zero-based output being made (outputs stored so far, within the
    current pipeline step); ``pipeline_step`` the zero-based pipeline step, None outside
    pipelines. ``preview`` is a small decoded preview on preview events, else None.
    """

    stage: str
    step: int
    total: int
    variant: int = 0
    pipeline_step: int | None = None
    preview: Image.Image | None = None
    model: str = ""
    queue_position: int | None = None

    @property
    def fraction(self) -> float:
        """step / total in [0, 1] (0 when the total is unknown)."""
        return min(max(self.step / self.total, 0.0), 1.0) if self.total > 0 else 0.0


def _box(box: result_pb2.Box) -> Box:
    return Box(box.x_min, box.y_min, box.x_max, box.y_max)


def result_of(output: job_pb2.JobOutput) -> Result | None:
    """The typed result of one output, or None for a plain image output."""
    kind = output.WhichOneof("result")
    if kind == "detections":
        d = output.detections
        return Detections(
            [Detection(x.label, x.score, _box(x.box)) for x in d.detections], d.image_width, d.image_height
        )
    if kind == "caption":
        return Caption(output.caption.text, list(output.caption.objects))
    if kind == "expansion":
        return PromptExpansion(output.expansion.original, output.expansion.expanded)
    if kind == "segmentation":
        return Segmentation(output.asset.name, output.segmentation.coverage)
    if kind == "face_identity":
        f = output.face_identity
        return FaceIdentity(_box(f.box), f.score, f.face_index, f.faces_found, f.face_crop)
    return None
