"""The turbo profile's compilation: ``torch.compile`` of a diffusion transformer's repeated blocks.

Regional compilation (diffusers' ``compile_repeated_blocks``): one graph serves all 19 double-stream
and one all 38 single-stream FLUX blocks (the 60 Qwen-Image blocks likewise), instead of one graph
of the whole transformer, so the first compile is several times shorter for nearly the same speed.
It happens at the first call, that is the first job (a new image size compiles once more, then
with dynamic shapes). Compiled code is kept in inductor's cache in the data dir
(``<data-dir>/cache/torchinductor``, or TORCHINDUCTOR_CACHE_DIR when the user set it), so later
starts reuse it and pay only dynamo's tracing.

float8 is not done here: it is a quantization at load (engines/flux.py ``float8_settings``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from paletta_server.models.types import LoadContext

log = logging.getLogger(__name__)
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_blocks(pipe: Any, lc: LoadContext) -> bool:
    """Compile the pipeline transformer's repeated blocks in place; False when it has none."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not getattr(transformer, "_repeated_blocks", None):
        return False
    if lc.compile_cache is not None and not os.environ.get(CACHE_ENV):
        os.environ[CACHE_ENV] = str(lc.compile_cache)  # read by inductor at its first compile
    # Not fullgraph: styles and IP-Adapters change the blocks' modules, and past dynamo's recompile
    # limit a fullgraph compile fails the job where this one runs the block uncompiled.
    transformer.compile_repeated_blocks(fullgraph=False)
    pipe._paletta_compiled = True
    log.info("compiling %s's repeated blocks (%s) at its first call; cache %s", type(transformer).__name__,
             ", ".join(transformer._repeated_blocks), os.environ.get(CACHE_ENV, "inductor's default"))
    return True


def is_compiled(pipe: Any) -> bool:
    return bool(getattr(pipe, "_paletta_compiled", False))
