"""A disk cache of NF4-quantized components (transformer, T5), so later loads skip quantization.

Quantizing FLUX's 12 B transformer and the T5 encoder to NF4 on every load costs seconds of a
cold start. The first load saves each quantized component with ``save_pretrained`` (bitsandbytes
4-bit serialization) under ``<cache>/<component>-<key>``; later loads read it back directly (its
config carries the quantization settings). The key hashes the component's source files (resolved
path, names, sizes, modification times), the quantization settings and the library versions, so a
changed source, setting or library gives a new entry; the stale one of the same source is removed.
Any failure here is logged and the load goes on uncached: the cache can only make loads faster.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from paletta_server.models.types import LoadContext, ModelSource

log = logging.getLogger(__name__)
ENV = "PALETTA_NF4_CACHE_DIR"
FORMAT = "nf4/bf16-compute/v1"
LIBRARIES = ("diffusers", "transformers", "bitsandbytes")
# hits / misses / writes / errors, for status and benchmarks
stats: Counter[str] = Counter()


def cache_dir(lc: LoadContext) -> Path | None:
    """Where NF4 components are cached: only for NF4 on CUDA, and only with a cache folder configured
    (``$PALETTA_NF4_CACHE_DIR`` when set, else the server's ``<models>/nf4-cache``)."""
    if lc.device.quantization != "nf4" or lc.device.name != "cuda":
        return None
    root = os.environ.get(ENV) or lc.cache_dir
    return Path(root) if root else None


def component_folder(source: ModelSource, component: str) -> Path | None:
    """The component's folder on disk: in a local source, or in the Hub snapshot already downloaded."""
    if source.local:
        folder = Path(source.path) / component
        return folder if folder.is_dir() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source.repo, f"{component}/config.json", revision=source.revision or None)
    except Exception:  # no hub library, odd revision: no key, no cache
        return None
    return Path(found).parent if isinstance(found, str) else None


def cache_key(source: ModelSource, component: str) -> str | None:
    """Hex key of one component's source and settings; None when its files are not on disk yet."""
    folder = component_folder(source, component)
    if folder is None:
        return None
    digest = hashlib.sha256(f"{FORMAT}\n{folder.resolve()}\n".encode())
    for name in LIBRARIES:
        try:
            digest.update(f"{name}={importlib.metadata.version(name)}\n".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{name}=-\n".encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _component_class(source: ModelSource, component: str) -> Any:
    """The class model_index.json names for a component, e.g. diffusers.FluxTransformer2DModel."""
    folder = component_folder(source, component)
    assert folder is not None
    library, class_name = json.loads((folder.parent / "model_index.json").read_text())[component]
    return getattr(importlib.import_module(library), class_name)


def load(root: Path, source: ModelSource, components: list[str], lc: LoadContext) -> dict[str, Any]:
    """{component: model} for every component with a current cache entry."""
    found: dict[str, Any] = {}
    for component in components:
        key = cache_key(source, component)
        entry = root / f"{component}-{key}"
        if key is None or not (entry / "config.json").exists():
            stats["misses"] += 1
            continue
        try:
            start = time.perf_counter()
            found[component] = _component_class(source, component).from_pretrained(entry, dtype=lc.device.dtype)
            stats["hits"] += 1
            log.info("nf4 cache: %s of %s loaded in %.1f s", component, source.describe(),
                     time.perf_counter() - start)
        except Exception:
            stats["errors"] += 1
            log.warning("nf4 cache: could not load %s; removing it and quantizing again", entry, exc_info=True)
            shutil.rmtree(entry, ignore_errors=True)
    return found


def store(root: Path, source: ModelSource, components: list[str], pipe: Any) -> None:
    """Save the pipeline's quantized components, replacing older entries of the same source."""
    for component in components:
        model = getattr(pipe, component, None)
        key = cache_key(source, component)
        if model is None or key is None or getattr(model, "hf_quantizer", None) is None:  # not quantized
            continue
        entry = root / f"{component}-{key}"
        tmp = root / f".tmp-{component}-{key}-{os.getpid()}"
        try:
            start = time.perf_counter()
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            origin = str(component_folder(source, component).resolve())  # type: ignore[union-attr]
            (tmp / "paletta-source.json").write_text(json.dumps({"component": component, "folder": origin}))
            for old in root.glob(f"{component}-*"):
                try:
                    same = json.loads((old / "paletta-source.json").read_text())["folder"] == origin
                except (OSError, ValueError, KeyError):
                    same = False
                if same and old != entry:
                    shutil.rmtree(old, ignore_errors=True)
            if entry.exists():
                shutil.rmtree(entry)
            os.replace(tmp, entry)
            stats["writes"] += 1
            log.info("nf4 cache: %s of %s written in %.1f s", component, source.describe(),
                     time.perf_counter() - start)
        except Exception:
            stats["errors"] += 1
            log.warning("nf4 cache: could not write %s", entry, exc_info=True)
            shutil.rmtree(tmp, ignore_errors=True)
