"""Process settings for ``paletta serve``: third-party libraries keep quiet and write only under
the data dir.

Run before any model library is imported (they read these variables once, at import), which
``serve`` can do because booting imports none of them. A variable the user has set is never
changed: that is how a user keeps a cache of their choosing.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import MutableMapping
from pathlib import Path


def process_defaults(data_dir: Path) -> dict[str, str]:
    cache = data_dir / "cache"
    return {
        # onnxruntime (BiRefNet through rembg) otherwise records telemetry sessions in
        # ~/.cache/Microsoft/DeveloperTools/.onnxruntime and $TMPDIR/.ses.
        "ORT_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "1",
        # Progress bars of downloads, weight loading and denoising loops (tqdm) flood a server's
        # log; jobs report progress as events instead.
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "DIFFUSERS_VERBOSITY": "error",
        # Compilation caches: numba (pymatting, imported by rembg) falls back to ~/.cache when its
        # package folder is read-only; torch inductor uses $TMPDIR/torchinductor_<user>; triton
        # uses ~/.triton. The Hugging Face cache (HF_HOME, its default ~/.cache/huggingface, and
        # so XDG_CACHE_HOME) is left alone: it is where the user's model weights and token live.
        "NUMBA_CACHE_DIR": str(cache / "numba"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "MPLCONFIGDIR": str(cache / "matplotlib"),
    }


def prepare_process(data_dir: Path, env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set every default the user has not set; return those that were set."""
    env = os.environ if env is None else env
    applied = {name: value for name, value in process_defaults(data_dir).items() if not env.get(name)}
    env.update(applied)
    return applied


def quiet_warnings() -> None:
    """Library warnings go through logging, each text once, instead of once per call site per job."""
    logging.captureWarnings(True)
    warnings.filterwarnings("once", category=FutureWarning)
    warnings.filterwarnings("once", category=UserWarning)
    # torchao (the turbo extra) registers its enums with torch's pytree at import, which newer torch
    # answers with one deprecation line per enum: addressed to torchao, not to a user of the server.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # bitsandbytes looks for optional CPU 4-bit kernels at import; Paletta quantizes on CUDA only.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
