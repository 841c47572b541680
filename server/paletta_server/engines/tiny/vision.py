"""Tiny random-weight vision and helper models in the real formats (see shared/notes/offline-models.md).

Each ``build_*(folder)`` writes what the matching loader in ``paletta_server.engines`` reads:
an ESRGAN ``.pth`` state dict (spandrel), a synthetic ``birefnet-general.onnx`` (rembg), and
transformers folders (``save_pretrained``) with tokenizers built from in-memory vocabularies.
All builds are seeded, so the same folder is written every time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SEED = 0

# The 91 COCO category ids of facebook/detr-resnet-50 ("N/A" for the unused ids).
COCO_LABELS = [
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A",
    "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _seed() -> None:
    import torch

    torch.manual_seed(SEED)


# -- tokenizers ---------------------------------------------------------------------------------
def _byte_chars() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def clip_tokenizer(pad_token: str | None = None, model_max_length: int = 77) -> Any:
    from transformers import CLIPTokenizer

    # Specials last, as in the real CLIP vocabulary (OWLv2 treats a query starting with id 0 as padding).
    vocab: dict[str, int] = {}
    for char in _byte_chars():
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    kwargs = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length, **kwargs)


def _clip_ids(tok: Any) -> dict:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}


def bert_tokenizer() -> Any:
    """A WordPiece vocabulary over characters, as BLIP uses (bos "[DEC]", plus "[ENC]")."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    chars = [chr(c) for c in range(33, 127)]
    words += chars + ["##" + c for c in chars]
    words += ["a", "photo", "of", "the", "cat", "dog", "sky", "red", "blue", "on", "in", "with"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=512)
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def opt_tokenizer() -> Any:
    from transformers import GPT2Tokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for char in _byte_chars():
        vocab.setdefault(char, len(vocab))
    return GPT2Tokenizer(vocab=vocab, merges=[], bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                         unk_token="<unk>", add_bos_token=True)


def qwen_tokenizer() -> Any:
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_chars())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": [
        "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
        "<|image_pad|>", "<|video_pad|>"]})
    tok.chat_template = CHATML_TEMPLATE
    return tok


# -- Real-ESRGAN (spandrel) ---------------------------------------------------------------------
def realesrgan_state_dict(num_feat: int = 8, num_block: int = 1, num_grow_ch: int = 32) -> dict:
    """A random state dict shaped like RealESRGAN_x4plus (RRDBNet, scale 4), any width/depth."""
    import torch

    g = torch.Generator().manual_seed(SEED)

    def conv(name: str, cin: int, cout: int) -> dict:
        w = torch.randn(cout, cin, 3, 3, generator=g) * (0.5 / (cin * 9) ** 0.5)
        return {f"{name}.weight": w, f"{name}.bias": torch.zeros(cout)}

    sd: dict = {}
    sd.update(conv("conv_first", 3, num_feat))
    for b in range(num_block):
        for r in range(1, 4):
            for c in range(1, 6):
                cin = num_feat + (c - 1) * num_grow_ch
                cout = num_feat if c == 5 else num_grow_ch
                sd.update(conv(f"body.{b}.rdb{r}.conv{c}", cin, cout))
    sd.update(conv("conv_body", num_feat, num_feat))
    sd.update(conv("conv_up1", num_feat, num_feat))
    sd.update(conv("conv_up2", num_feat, num_feat))
    sd.update(conv("conv_hr", num_feat, num_feat))
    sd.update(conv("conv_last", num_feat, 3))
    return sd


def build_realesrgan(folder: Path) -> None:
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": realesrgan_state_dict()}, folder / "RealESRGAN_x4plus.pth")


# -- BiRefNet-general (rembg ONNX) --------------------------------------------------------------
def build_birefnet(folder: Path) -> None:
    """A cheap synthetic ONNX with BiRefNet-general's interface.

    Input ``input_image`` (1, 3, 1024, 1024), ImageNet-normalised; output[0] logits (1, 1, 1024, 1024).
    Inside: a stride-16 3x3 convolution (brightness minus mean, so bright regions are "subject"),
    then a bilinear resize back to 1024 px.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weight = np.full((1, 3, 3, 3), 1.0 / 9.0, dtype=np.float32)
    bias = np.array([-0.5], dtype=np.float32)
    scales = np.array([1.0, 1.0, 16.0, 16.0], dtype=np.float32)
    nodes = [
        helper.make_node("Conv", ["input_image", "w", "b"], ["low"], kernel_shape=[3, 3], strides=[16, 16],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["low", "", "scales"], ["logits"], mode="linear"),
    ]
    graph = helper.make_graph(
        nodes, "birefnet_general_tiny",
        [helper.make_tensor_value_info("input_image", TensorProto.FLOAT, [1, 3, 1024, 1024])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 1024, 1024])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b"),
                     numpy_helper.from_array(scales, "scales")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="paletta-tiny")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "birefnet-general.onnx"))


# -- CLIPSeg ------------------------------------------------------------------------------------
def build_clipseg(folder: Path) -> None:
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    _seed()
    tok = clip_tokenizer()
    config = CLIPSegConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
                     **_clip_ids(tok)},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 64, "patch_size": 16},
        projection_dim=32, extract_layers=[1], reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    model = CLIPSegForImageSegmentation(config).eval()
    processor = CLIPSegProcessor(
        image_processor=ViTImageProcessor(size={"height": 64, "width": 64}, do_normalize=True,
                                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
        tokenizer=tok,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


# -- DETR ---------------------------------------------------------------------------------------
def build_detr(folder: Path) -> None:
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    _seed()
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                            layer_type="basic", out_features=["stage4"])
    config = DetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=12,
        id2label=dict(enumerate(COCO_LABELS)), label2id={},
    )
    model = DetrForObjectDetection(config).eval()
    model.save_pretrained(folder)
    DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(folder)


# -- OWLv2 --------------------------------------------------------------------------------------
def build_owlv2(folder: Path) -> None:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    _seed()
    tok = clip_tokenizer(pad_token="!", model_max_length=16)  # as OWLv2's: queries padded to 16
    config = Owlv2Config(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 16,
                     **_clip_ids(tok)},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 64, "patch_size": 16},
        projection_dim=32,
    )
    model = Owlv2ForObjectDetection(config).eval()
    # The heads' default init (std 1) saturates the sigmoids: boxes collapse and scores are 0.
    # Small weights give boxes near their grid cells and scores near 0.5, like a real model's range.
    import torch

    with torch.no_grad():
        for head in (model.class_head, model.box_head, model.objectness_head):
            for param in head.parameters():
                param.normal_(0.0, 0.02) if param.dim() > 1 else param.zero_()
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}),
                               tokenizer=tok)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


# -- BLIP / BLIP-2 ------------------------------------------------------------------------------
def build_blip(folder: Path) -> None:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    _seed()
    tok = bert_tokenizer()
    config = BlipConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64,
                     "encoder_hidden_size": 32,
                     "bos_token_id": tok.convert_tokens_to_ids("[DEC]"), "pad_token_id": tok.pad_token_id,
                     "sep_token_id": tok.sep_token_id, "eos_token_id": tok.sep_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tok)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def build_blip2(folder: Path) -> None:
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        OPTConfig,
    )

    _seed()
    tok = opt_tokenizer()
    num_query_tokens = 4
    # The processor adds "<image>" to the tokenizer: build it first, then size the model's vocabulary.
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                               tokenizer=tok, num_query_tokens=num_query_tokens)
    image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        qformer_config={"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "encoder_hidden_size": 32},
        text_config=OPTConfig(vocab_size=len(processor.tokenizer), hidden_size=32, ffn_dim=64,
                              num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32,
                              max_position_embeddings=256,
                              bos_token_id=0, pad_token_id=1, eos_token_id=2).to_dict(),
        num_query_tokens=num_query_tokens, image_token_index=image_token_index,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


# -- Qwen2.5 instruct ---------------------------------------------------------------------------
def build_qwen_llm(folder: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _seed()
    tok = qwen_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
