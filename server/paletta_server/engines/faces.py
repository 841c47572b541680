"""Faces for PuLID: InsightFace detection and ArcFace embedding, alignment, facexlib face parsing.

Two registry residents:

- ``antelopev2`` (:class:`FaceAnalyzer`): InsightFace's ``FaceAnalysis`` over the antelopev2
  bundle, detection (``scrfd_10g_bnkps.onnx``: boxes, scores, five landmarks) and recognition
  (``glintr100.onnx``: the 512-d ArcFace embedding PuLID conditions on). The source is either an
  insightface root (``<root>/models/antelopev2/*.onnx``) or the bundle folder itself (a snapshot
  of ``DIAMONIK7777/antelopev2``, what PuLID downloads). The bundle's landmark and gender/age
  models are not loaded: PuLID does not use them.
- ``facexlib-parsing`` (:class:`FaceParser`): facexlib's BiSeNet (19 face classes) with the
  weights of facexlib's ``parsing_bisenet.pth``, read from safetensors only (Paletta never
  unpickles weights; convert the release file once, see ``load_face_parser``).

Alignment: PuLID runs facexlib's RetinaFace a second time to find five landmarks and warps the
"center" face onto facexlib's FFHQ 512 template. Paletta warps the face the request chose (by
``face_index``) with InsightFace's own five landmarks onto the same template, with the same
OpenCV calls and gray border as ``FaceRestoreHelper.align_warp_face``, so the identity always
comes from one face and a second detector (and its pickled weights) is not needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paletta_server.errors import ModelUnavailable
from paletta_server.models.types import LoadContext, ModelSource

BUNDLE = "antelopev2"
DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNIZER_FILE = "glintr100.onnx"
PARSING_FILE = "parsing_bisenet.safetensors"
DETECTION_SIZE = (640, 640)  # PuLID's det_size
DETECTION_THRESHOLD = 0.5
CROP_SIZE = 512
# facexlib FaceRestoreHelper's five-point FFHQ template for a 512x512 crop (eyes, nose, mouth corners).
FFHQ_TEMPLATE_512 = (
    (192.98138, 239.94708), (318.90277, 240.1936), (256.63416, 314.01935),
    (201.26117, 371.41043), (313.08905, 371.15118),
)
BORDER_VALUE = (135, 133, 132)  # facexlib's gray border for faces near the edge
# BiSeNet classes PuLID whitens: background, hat, cloth, ears, earring, neck, necklace.
BACKGROUND_LABELS = (0, 16, 18, 7, 8, 9, 14, 15)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DetectedFace:
    """One face: box (x_min, y_min, x_max, y_max) in the photo's pixels, detector score,
    five landmarks, and its ArcFace embedding (512 floats)."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: Any  # (5, 2) float32
    embedding: Any  # (512,) float32

    @property
    def area(self) -> float:
        return max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0)


@dataclass
class FaceAnalyzer:
    """The loaded antelopev2 detector + recogniser (``insightface.app.FaceAnalysis``)."""

    app: Any
    folder: str
    resident_bytes: int = 0


def bundle_folder(path: Path) -> Path:
    """The folder holding the ONNX files: ``path`` itself or insightface's ``path/models/antelopev2``."""
    for candidate in (path, path / "models" / BUNDLE, path / BUNDLE):
        if (candidate / DETECTOR_FILE).exists():
            return candidate
    raise ModelUnavailable(
        f"{BUNDLE}: no {DETECTOR_FILE} in {path} or {path / 'models' / BUNDLE}", metadata={"model": BUNDLE})


def load_face_analysis(source: ModelSource, lc: LoadContext) -> FaceAnalyzer:
    """Registry loader for ``antelopev2``: detection + recognition sessions (ONNX Runtime)."""
    from insightface.app import FaceAnalysis

    if source.local:
        folder = bundle_folder(Path(source.path))
    else:
        from huggingface_hub import snapshot_download

        folder = bundle_folder(Path(snapshot_download(
            source.repo, revision=source.revision or None, allow_patterns=[DETECTOR_FILE, RECOGNIZER_FILE])))
    missing = [f for f in (DETECTOR_FILE, RECOGNIZER_FILE) if not (folder / f).exists()]
    if missing:
        raise ModelUnavailable(f"{source.key}: {', '.join(missing)} missing in {folder}",
                               metadata={"model": source.key})
    providers = onnx_providers(lc.device.name)
    app = FaceAnalysis(name=str(folder), allowed_modules=["detection", "recognition"], providers=providers)
    if "recognition" not in app.models:
        raise ModelUnavailable(f"{source.key}: {RECOGNIZER_FILE} in {folder} is not an ArcFace recogniser",
                               metadata={"model": source.key})
    on_gpu = providers[0] == "CUDAExecutionProvider"
    app.prepare(ctx_id=0 if on_gpu else -1, det_thresh=DETECTION_THRESHOLD, det_size=DETECTION_SIZE)
    size = sum((folder / f).stat().st_size for f in (DETECTOR_FILE, RECOGNIZER_FILE))
    return FaceAnalyzer(app, str(folder), size)


def onnx_providers(device: str) -> list[str]:
    """onnxruntime's providers for this device: CUDA first only where the installed onnxruntime has it
    (the plain wheel does not; insightface would then warn on every load and run on the CPU anyway)."""
    import onnxruntime

    if device == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def detect_faces(analyzer: FaceAnalyzer, image: Any) -> list[DetectedFace]:
    """Every face in a PIL image with its embedding, largest box first (ties: higher score first)."""
    import cv2
    import numpy as np

    bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    faces = [
        DetectedFace(tuple(float(x) for x in f.bbox[:4]), float(f.det_score), np.asarray(f.kps, dtype=np.float32),
                     np.asarray(f.embedding, dtype=np.float32))
        for f in analyzer.app.get(bgr)
    ]
    return sorted(faces, key=lambda f: (-f.area, -f.score))


def align_face(image: Any, landmarks: Any, size: int = CROP_SIZE) -> Any:
    """The face warped onto the FFHQ five-point template (facexlib's ``align_warp_face``), RGB PIL."""
    import cv2
    import numpy as np
    from PIL import Image

    template = np.asarray(FFHQ_TEMPLATE_512, dtype=np.float32) * (size / 512.0)
    matrix = cv2.estimateAffinePartial2D(np.asarray(landmarks, dtype=np.float32), template, method=cv2.LMEDS)[0]
    if matrix is None:  # degenerate landmarks: fall back to an exact similarity from the eyes
        matrix = cv2.estimateAffinePartial2D(np.asarray(landmarks, dtype=np.float32)[:2], template[:2])[0]
    rgb = np.asarray(image.convert("RGB"))
    crop = cv2.warpAffine(rgb, matrix, (size, size), borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_VALUE)
    return Image.fromarray(crop, "RGB")


# -- face parsing ---------------------------------------------------------------------------------
@dataclass
class FaceParser:
    """facexlib's BiSeNet face parser on the device."""

    model: Any


def _parsing_file(source: ModelSource) -> Path:
    if source.local:
        path = Path(source.path)
        if path.is_dir():
            found = [path / (source.filename or PARSING_FILE)] + sorted(path.glob("*.safetensors"))
            path = next((p for p in found if p.exists()), found[0])
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source.repo, source.filename or PARSING_FILE, revision=source.revision or None))
    if path.suffix != ".safetensors":
        raise ModelUnavailable(
            f"{source.key}: {path.name} is not safetensors; only safetensors weights load. Convert facexlib's "
            "parsing_bisenet.pth once: safetensors.torch.save_file(torch.load(p, weights_only=True), "
            f"'{PARSING_FILE}')", metadata={"model": source.key})
    if not path.exists():
        raise ModelUnavailable(f"{source.key}: {path} does not exist", metadata={"model": source.key})
    return path


def load_face_parser(source: ModelSource, lc: LoadContext) -> FaceParser:
    """Registry loader for ``facexlib-parsing``: ``facexlib.parsing.bisenet.BiSeNet(num_class=19)``
    with facexlib's ``parsing_bisenet`` state dict (the same keys as the .pth, saved as safetensors)."""
    from facexlib.parsing.bisenet import BiSeNet
    from safetensors.torch import load_file

    state = load_file(str(_parsing_file(source)))
    model = BiSeNet(num_class=19)
    model.load_state_dict(state, strict=True)
    # Parsing stays in fp32 (as PuLID runs it): it is small and its argmax decides the mask.
    return FaceParser(model.eval().to(lc.device.name))


def face_features_image(parser: FaceParser, aligned: Any) -> Any:
    """PuLID's input to EVA-CLIP: the aligned face in grayscale, every non-face class white.

    Returns a (1, 3, H, W) float tensor in [0, 1] on the parser's device.
    """
    import numpy as np
    import torch
    from torchvision.transforms.functional import normalize

    device = next(parser.model.parameters()).device
    x = torch.from_numpy(np.asarray(aligned.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = x.unsqueeze(0).to(device)
    with torch.no_grad():
        logits = parser.model(normalize(x, IMAGENET_MEAN, IMAGENET_STD))[0]
    labels = logits.argmax(dim=1, keepdim=True)
    background = torch.zeros_like(labels, dtype=torch.bool)
    for label in BACKGROUND_LABELS:
        background |= labels == label
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).repeat(1, 3, 1, 1)
    return torch.where(background, torch.ones_like(x), gray)


def to_pil(tensor: Any) -> Any:
    """A (1, 3, H, W) tensor in [0, 1] as an RGB PIL image (the face crop asset)."""
    from PIL import Image

    array = (tensor[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")

