"""Object detection: DETR-ResNet-50 (91 COCO classes) and OWLv2 (open-vocabulary text queries).

Boxes come back in the original image's pixel coordinates, clipped to it, sorted by score.
OWLv2 pads the image to a square before resizing, so its boxes are relative to that square:
they are scaled with ``target_sizes = (max(h, w),) * 2`` and then clipped to the real image;
what keeps less than a pixel of width or height inside it is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from paletta_server.engines.common import load_transformers


@dataclass
class Detector:
    model: Any
    processor: Any


@dataclass(frozen=True)
class Box:
    label: str
    score: float
    x_min: float
    y_min: float
    x_max: float
    y_max: float


def load_detr(source: Any, lc: Any) -> Detector:
    from transformers import AutoImageProcessor, DetrForObjectDetection

    return Detector(*load_transformers(DetrForObjectDetection, AutoImageProcessor, source, lc))


def load_owlv2(source: Any, lc: Any) -> Detector:
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    return Detector(*load_transformers(Owlv2ForObjectDetection, Owlv2Processor, source, lc))


def _boxes(result: dict, labels: list[str], width: int, height: int) -> list[Box]:
    out = []
    rows = zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist(), strict=True)
    for score, label, box in rows:
        x0, y0, x1, y1 = box
        x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
        y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
        if x1 - x0 < 1.0 or y1 - y0 < 1.0:
            continue  # (nearly) wholly outside the image, e.g. in OWLv2's padding: not a pixel of it left
        out.append(Box(labels[int(label)], float(score), x0, y0, x1, y1))
    out.sort(key=lambda b: b.score, reverse=True)
    return out


def detect(det: Detector, image: Image.Image, threshold: float = 0.7) -> list[Box]:
    import torch

    image = image.convert("RGB")
    inputs = det.processor(images=image, return_tensors="pt").to(det.model.device)
    with torch.inference_mode():
        outputs = det.model(**inputs)
    result = det.processor.post_process_object_detection(
        outputs, threshold=threshold, target_sizes=[(image.height, image.width)])[0]
    id2label = det.model.config.id2label
    labels = [id2label.get(i, str(i)) for i in range(max(id2label) + 1)] if id2label else []
    return _boxes(result, labels, image.width, image.height)


def ground(det: Detector, image: Image.Image, queries: list[str], threshold: float = 0.1) -> list[Box]:
    import torch

    image = image.convert("RGB")
    inputs = det.processor(text=[list(queries)], images=image, return_tensors="pt").to(det.model.device)
    with torch.inference_mode():
        outputs = det.model(**inputs)
    side = max(image.width, image.height)
    result = det.processor.image_processor.post_process_object_detection(
        outputs, threshold=threshold, target_sizes=[(side, side)])[0]
    return _boxes(result, list(queries), image.width, image.height)
