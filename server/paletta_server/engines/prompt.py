"""Prompt expansion with Qwen2.5-1.5B-Instruct: a short prompt becomes a verbose FLUX-style one.

Sampling is seeded in a forked RNG, so the same prompt and seed give the same expansion and
nothing else's random state changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paletta_server.engines.caption import cancel_criteria
from paletta_server.engines.common import load_transformers

SYSTEM_PROMPT = (
    "You rewrite short image prompts for the FLUX text-to-image model. Expand the user's prompt into one "
    "vivid, detailed description in a single paragraph: the subject and its details, the setting, the "
    "lighting, the camera and lens, the mood and the style. Keep every element the user asked for. "
    "Reply with the description only, without preamble or quotes."
)


@dataclass
class PromptRewriter:
    model: Any
    tokenizer: Any


def load_qwen_llm(source: Any, lc: Any) -> PromptRewriter:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = lc.device.dtype if getattr(lc.device, "name", "cpu") == "cuda" else torch.float32
    return PromptRewriter(*load_transformers(AutoModelForCausalLM, AutoTokenizer, source, lc, dtype=dtype))


def _clean(text: str) -> str:
    text = " ".join(text.split()).strip()
    for quote in ('"', "'", "\u201c\u201d"):
        if len(text) >= 2 and text[0] == quote[0] and text[-1] == quote[-1]:
            text = text[1:-1].strip()
    return text


def expand(rewriter: PromptRewriter, prompt: str, seed: int = 0, max_tokens: int = 160,
           check: Callable[[], None] | None = None) -> str:
    import torch

    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt.strip()}]
    inputs = rewriter.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                    return_tensors="pt").to(rewriter.model.device)
    tok = rewriter.tokenizer
    devices = [rewriter.model.device.index or 0] if rewriter.model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
        out = rewriter.model.generate(
            **inputs, do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=max_tokens,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            stopping_criteria=cancel_criteria(check),
        )
    new_tokens = out[0, inputs["input_ids"].shape[1]:]
    return _clean(tok.decode(new_tokens, skip_special_tokens=True))
