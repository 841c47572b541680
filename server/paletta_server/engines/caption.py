"""Captions: BLIP-large (FAST, one sentence) and BLIP-2 OPT-2.7b (DEEP, several sentences)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from paletta_server.engines.common import load_transformers

DEEP_PROMPT = (
    "Question: Describe this image in detail: the subjects, where they are and what surrounds them. Answer:"
)


@dataclass
class Captioner:
    model: Any
    processor: Any
    prompt: str = ""


def _dtype(lc: Any) -> Any:
    import torch

    device = getattr(lc, "device", None)
    return device.dtype if device is not None and device.name == "cuda" else torch.float32


def load_blip(source: Any, lc: Any) -> Captioner:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    return Captioner(*load_transformers(BlipForConditionalGeneration, BlipProcessor, source, lc, dtype=_dtype(lc)))


def load_blip2(source: Any, lc: Any) -> Captioner:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model, processor = load_transformers(Blip2ForConditionalGeneration, Blip2Processor, source, lc, dtype=_dtype(lc))
    return Captioner(model, processor, DEEP_PROMPT)


def cancel_criteria(check: Callable[[], None] | None) -> Any:
    """A StoppingCriteria list that calls ``check`` (which raises to cancel) after every token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    if check is None:
        return None

    class _Check(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            check()
            import torch

            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Check()])


def _tidy(text: str) -> str:
    return " ".join(text.split()).strip()


def caption(cap: Captioner, image: Image.Image, max_tokens: int = 40, deep: bool = False,
            check: Callable[[], None] | None = None) -> str:
    import torch

    image = image.convert("RGB")
    if cap.prompt:
        inputs = cap.processor(images=image, text=cap.prompt, return_tensors="pt")
    else:
        inputs = cap.processor(images=image, return_tensors="pt")
    inputs = inputs.to(cap.model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(cap.model.dtype)
    options: dict[str, Any] = {"max_new_tokens": max_tokens, "stopping_criteria": cancel_criteria(check)}
    if deep:
        # Several sentences: beam search with a length floor and no repeated trigrams.
        options.update(num_beams=3, min_new_tokens=min(20, max_tokens), no_repeat_ngram_size=3,
                       repetition_penalty=1.2)
    else:
        options.update(num_beams=3)
    with torch.inference_mode():
        out = cap.model.generate(**inputs, **options)
    tokens = out[0]
    prompt_ids = inputs.get("input_ids")
    # Decoder-only captioners (BLIP-2/OPT) return the prompt first: keep only the new tokens.
    if cap.prompt and prompt_ids is not None and tokens.shape[0] >= prompt_ids.shape[1] and \
            torch.equal(tokens[:prompt_ids.shape[1]].cpu(), prompt_ids[0].cpu()):
        tokens = tokens[prompt_ids.shape[1]:]
    text = _tidy(cap.processor.decode(tokens, skip_special_tokens=True))
    if cap.prompt and text.startswith(cap.prompt):
        text = text[len(cap.prompt):].strip()
    return text
