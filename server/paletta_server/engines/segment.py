"""Text-prompted masks with CLIPSeg (CIDAS/clipseg-rd64-refined).

The model predicts a low-resolution probability map for the text; it is resized to the
original image, thresholded, grown by ``dilate`` pixels and softened by a Gaussian ``feather``.
The mask is an L-mode image (white = selected) at the input's size, ready for Inpaint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFilter

from paletta_server.engines.common import load_transformers


@dataclass
class ClipSeg:
    model: Any
    processor: Any


def load_clipseg(source: Any, lc: Any) -> ClipSeg:
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    return ClipSeg(*load_transformers(CLIPSegForImageSegmentation, CLIPSegProcessor, source, lc))


def probability_map(seg: ClipSeg, image: Image.Image, text: str) -> Image.Image:
    """CLIPSeg's probability for ``text`` as an "F" image at the original size."""
    import numpy as np
    import torch

    inputs = seg.processor(text=[text], images=[image.convert("RGB")], padding=True, return_tensors="pt")
    inputs = inputs.to(seg.model.device)
    with torch.inference_mode():
        logits = seg.model(**inputs).logits
    prob = torch.sigmoid(logits.float()).reshape(-1, *logits.shape[-2:])[0].cpu().numpy().astype(np.float32)
    return Image.fromarray(prob, mode="F").resize(image.size, Image.Resampling.BILINEAR)


def make_mask(prob: Image.Image, threshold: float, dilate: int = 0, feather: int = 0) -> Image.Image:
    import numpy as np

    mask = (np.asarray(prob) >= threshold).astype(np.uint8) * 255
    if dilate > 0:
        import cv2

        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate + 1, 2 * dilate + 1))
        mask = cv2.dilate(mask, kernel)
    out = Image.fromarray(mask, mode="L")
    if feather > 0:
        out = out.filter(ImageFilter.GaussianBlur(feather))
    return out


def segment(seg: ClipSeg, image: Image.Image, text: str, threshold: float = 0.4, dilate: int = 0,
            feather: int = 0) -> tuple[Image.Image, float]:
    """Return (L mask at the image's size, fraction of pixels selected)."""
    import numpy as np

    mask = make_mask(probability_map(seg, image, text), threshold, dilate, feather)
    coverage = float(np.asarray(mask, dtype=np.float32).mean() / 255.0)
    return mask, coverage
