"""Expand: Qwen2.5-1.5B-Instruct rewrites a short prompt as a verbose FLUX-style one, seeded."""

from __future__ import annotations

from typing import Any

from paletta.v1 import prompt_pb2, result_pb2
from paletta_server.capabilities import common
from paletta_server.capabilities._vision import check_tokens, inference
from paletta_server.capabilities.base import HIGH, Capability, PrepareContext, RunContext
from paletta_server.models.profiles import Profile

MODEL = "qwen2.5-1.5b-instruct"
DEFAULT_TOKENS = 160


def prepare(request: prompt_pb2.ExpandRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    common.check_prompt(v, request.prompt)
    common.check_seed(v, request)
    request.max_tokens = check_tokens(v, request.max_tokens, DEFAULT_TOKENS)
    v.raise_if_any()
    if not request.HasField("seed"):
        request.seed = 0  # the contract: unset means 0, so a prompt alone is reproducible
    return request


def models(request: Any, profile: Profile) -> list[str]:
    return [MODEL]


def run(request: prompt_pb2.ExpandRequest, ctx: RunContext) -> None:
    from paletta_server.engines import prompt as engine

    rewriter = ctx.model(MODEL)
    expanded = inference(ctx, lambda: engine.expand(rewriter, request.prompt, request.seed,
                                                    request.max_tokens, check=ctx.check_cancelled))
    ctx.emit_output(None, seed=request.seed, parameters={"model": MODEL, "seed": request.seed,
                                                         "max_tokens": request.max_tokens},
                    result=result_pb2.PromptExpansion(original=request.prompt, expanded=expanded))


CAPABILITY = Capability("expand", prompt_pb2.ExpandRequest, prepare, models, run, model_keys=(MODEL,),
                        result_type=result_pb2.PromptExpansion, makes="", default_priority=HIGH)
