"""Tiny identity (PuLID) builds in the real formats, loaded back by engines/faces.py and engines/pulid.py.

- ``antelopev2``: two synthetic ONNX graphs in insightface's layout ``<root>/models/antelopev2/``.
  ``scrfd_10g_bnkps.onnx`` has SCRFD's nine outputs (score, box, five-point landmarks for
  strides 8/16/32, two anchors per cell) on a fixed 128x128 input; only stride 32 fires: a
  32x32 cell of the detector's input whose mean brightness is above 0.4 in SCRFD's normalised
  scale (a mean pixel value above ~179 after letterboxing) is a face, and a bright cell's bright right and
  lower neighbours widen its box, so a bright 2x2 block is one 64x64 face and a lone cell a
  32x32 one (largest-face rules are testable). ``glintr100.onnx`` is an ArcFace-shaped
  recogniser (1x3x112x112 → 512): 8x8 average pooling and a seeded random linear map, so
  different face textures embed differently.
- ``eva02-clip-l-336``: a timm ``eva02_large_patch14_clip_336`` with 21 blocks of width 16 on
  28x28 inputs, saved as ``open_clip_model.safetensors`` (open_clip's ``visual.trunk.*`` keys)
  with a timm ``config.json`` carrying the ``model_args``.
- ``pulid-flux``: IDFormer + 2 CA modules (tiny FLUX has 1 double and 1 single block) with
  PuLID's key layout, sized for the tiny EVA (width 16) and the tiny transformer (width 32).
- ``facexlib-parsing``: facexlib's BiSeNet (full size, 13 M parameters: its widths are fixed in
  facexlib) with seeded random weights, as ``parsing_bisenet.safetensors``.
- ``flux-dev-pipeline`` has nothing of its own: its loader reads the tiny ``flux-dev`` build.
"""

from __future__ import annotations

import json
from pathlib import Path

SEED = 0
DETECTOR_EDGE = 128
EVA_WIDTH = 16
EVA_EMBED = 16
EVA_IMAGE = 28
FLUX_INNER_DIM = 32  # tiny FluxTransformer2DModel: 2 heads of 16
ID_TOKENS_WIDTH = 16  # the IDFormer's output (the CA modules' kv_dim)
IDFORMER_DIM = 16
# Landmarks as fractions of a face box: eyes, nose, mouth corners (roughly the FFHQ layout).
LANDMARKS = ((0.32, 0.38), (0.68, 0.38), (0.5, 0.56), (0.36, 0.76), (0.64, 0.76))


def build_dev_pipeline(folder: Path) -> None:
    (folder / "README.txt").write_text("flux-dev-pipeline loads the flux-dev source; nothing to build here.\n")


# -- InsightFace ----------------------------------------------------------------------------------
def _detector() -> object:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes: list = []
    inits: list = []

    def const(name: str, value: object) -> str:
        array = value if isinstance(value, np.ndarray) else np.asarray(value, dtype=np.float32)
        inits.append(numpy_helper.from_array(array, name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def rows(tensor: str, channels: int, name: str) -> str:
        """(1, C, h, w) → (h*w*2, C): one row per cell and anchor, as SCRFD emits them."""
        t = node("Transpose", [tensor], f"{name}_t", perm=[0, 2, 3, 1])
        r = node("Reshape", [t, const(f"{name}_s1", np.array([-1, channels], dtype=np.int64))], f"{name}_r")
        d = node("Concat", [r, r], f"{name}_d", axis=1)
        return node("Reshape", [d, const(f"{name}_s2", np.array([-1, channels], dtype=np.int64))], name)

    gray = node("ReduceMean", ["input.1"], "gray", axes=[1], keepdims=1)
    outputs: dict[str, list[str]] = {"score": [], "bbox": [], "kps": []}
    for stride in (8, 16, 32):
        pooled = node("AveragePool", [gray], f"pool{stride}", kernel_shape=[stride, stride], strides=[stride, stride])
        if stride != 32:
            zero = node("Mul", [pooled, const(f"zero{stride}", 0.0)], f"zeros{stride}")
            one = node("Add", [zero, const(f"one{stride}", 1.0)], f"ones{stride}")
            outputs["score"].append(rows(zero, 1, f"score_{stride}"))
            outputs["bbox"].append(rows(node("Concat", [one] * 4, f"box4_{stride}", axis=1), 4, f"bbox_{stride}"))
            outputs["kps"].append(rows(node("Concat", [zero] * 10, f"kps10_{stride}", axis=1), 10, f"kps_{stride}"))
            continue
        shifted = node("Sub", [pooled, const("threshold", 0.4)], "shifted")
        bright = node("Sigmoid", [node("Mul", [shifted, const("sharpness", 100.0)], "sharp")], "bright")
        neighbours = {}
        for name, (row, col) in {"left": (1, 0), "up": (0, 1), "right": (1, 2), "down": (2, 1)}.items():
            kernel = np.zeros((1, 1, 3, 3), dtype=np.float32)
            kernel[0, 0, row, col] = 1.0
            neighbours[name] = node("Conv", [bright, const(f"k_{name}", kernel)], f"n_{name}", pads=[1, 1, 1, 1])
        one = const("one", 1.0)
        not_left = node("Sub", [one, neighbours["left"]], "not_left")
        not_up = node("Sub", [one, neighbours["up"]], "not_up")
        score = node("Mul", [node("Mul", [bright, not_left], "s1"), not_up], "score32")
        right = node("Add", [one, neighbours["right"]], "extent_x")
        down = node("Add", [one, neighbours["down"]], "extent_y")
        zero = node("Mul", [bright, const("zero32", 0.0)], "zeros32")
        outputs["score"].append(rows(score, 1, "score_32"))
        outputs["bbox"].append(rows(node("Concat", [zero, zero, right, down], "box4_32", axis=1), 4, "bbox_32"))
        points = []
        for i, (fx, fy) in enumerate(LANDMARKS):
            points.append(node("Mul", [right, const(f"fx{i}", fx)], f"kx{i}"))
            points.append(node("Mul", [down, const(f"fy{i}", fy)], f"ky{i}"))
        outputs["kps"].append(rows(node("Concat", points, "kps10_32", axis=1), 10, "kps_32"))
    names = outputs["score"] + outputs["bbox"] + outputs["kps"]
    graph = helper.make_graph(
        nodes, "tiny_scrfd", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, DETECTOR_EDGE,
                                                                                          DETECTOR_EDGE])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _recognizer() -> object:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(SEED)
    weight = (rng.standard_normal((3 * 14 * 14, 512)) * 0.5).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_arcface", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 512])],
        initializer=[numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def build_antelopev2(folder: Path) -> None:
    import onnx

    bundle = folder / "models" / "antelopev2"
    bundle.mkdir(parents=True, exist_ok=True)
    onnx.save(_detector(), str(bundle / "scrfd_10g_bnkps.onnx"))
    onnx.save(_recognizer(), str(bundle / "glintr100.onnx"))


# -- EVA02-CLIP, PuLID, face parsing --------------------------------------------------------------
def build_eva(folder: Path) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    model_args = {"img_size": EVA_IMAGE, "embed_dim": EVA_WIDTH, "depth": 21, "num_heads": 2}
    model = timm.create_model("eva02_large_patch14_clip_336", pretrained=False, num_classes=EVA_EMBED, **model_args)
    state = {f"visual.trunk.{k}": v.contiguous() for k, v in model.state_dict().items() if "rope" not in k}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "eva02_large_patch14_clip_336", "num_classes": EVA_EMBED, "model_args": model_args,
        "pretrained_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                           "input_size": [3, EVA_IMAGE, EVA_IMAGE]},
    }, indent=1))


def pulid_state_dict(seed: int = SEED, ca_count: int = 2) -> dict:
    """Random PuLID-FLUX weights in the real key layout, sized for the tiny EVA and FLUX."""
    import torch

    from paletta_server.engines.pulid import ARCFACE_DIM, IDFormerShape, PulidModules

    torch.manual_seed(seed)
    shape = IDFormerShape(dim=IDFORMER_DIM, depth=5, heads=1, num_id_token=5, num_queries=32,
                          output_dim=ID_TOKENS_WIDTH, ff_mult=4.0, vit_dim=EVA_WIDTH, mapping_dim=16,
                          id_in_dim=ARCFACE_DIM + EVA_EMBED)
    modules = PulidModules(shape, ca_count, FLUX_INNER_DIM, 1, ID_TOKENS_WIDTH)
    with torch.no_grad():
        # Stronger than default init, so that the face (not the learned queries) dominates the
        # tokens and the tokens visibly move tiny outputs.
        modules.pulid_encoder.latents.mul_(0.1)
        for attn, _ff in modules.pulid_encoder.layers:
            attn.to_out.weight.mul_(6.0)
        for ca in modules.pulid_ca:
            ca.to_out.weight.mul_(4.0)
    return {k: v.contiguous() for k, v in modules.state_dict().items()}


def build_pulid(folder: Path) -> None:
    from safetensors.torch import save_file

    save_file(pulid_state_dict(), str(folder / "pulid_flux_v0.9.1.safetensors"))


def build_face_parser(folder: Path) -> None:
    import torch
    from facexlib.parsing.bisenet import BiSeNet
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    state = {k: v.contiguous() for k, v in BiSeNet(num_class=19).state_dict().items()}
    save_file(state, str(folder / "parsing_bisenet.safetensors"))
