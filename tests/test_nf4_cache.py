"""NF4 cache (engines/nf4_cache.py): keys follow the source files, entries are reused and replaced.

The cache only runs for NF4 on CUDA. Keys are tested directly; the save / load round trip runs on
the CPU by letting diffusers' bitsandbytes quantizer place weights on the CPU (bitsandbytes itself
quantizes there), which is what the first and the later loads of a CUDA server do, minus the GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from paletta_server.engines import flux, nf4_cache
from paletta_server.models.types import Device, LoadContext, ModelSource


def _folder(root: Path) -> Path:
    for component in ("transformer", "text_encoder_2"):
        (root / component).mkdir(parents=True)
        (root / component / "config.json").write_text('{"a": 1}')
        (root / component / "weights.safetensors").write_bytes(b"x" * 64)
    (root / "model_index.json").write_text("{}")
    return root


def test_key_is_stable_and_per_component(tmp_path):
    source = ModelSource("flux-schnell", path=_folder(tmp_path / "m"))
    key = nf4_cache.cache_key(source, "transformer")
    assert key and len(key) == 32
    assert nf4_cache.cache_key(source, "transformer") == key
    assert nf4_cache.cache_key(source, "text_encoder_2") not in (None, key)


def test_key_changes_when_a_source_file_changes(tmp_path):
    source = ModelSource("flux-schnell", path=_folder(tmp_path / "m"))
    before = nf4_cache.cache_key(source, "transformer")
    t5_before = nf4_cache.cache_key(source, "text_encoder_2")
    weights = tmp_path / "m" / "transformer" / "weights.safetensors"
    weights.write_bytes(b"y" * 65)
    assert nf4_cache.cache_key(source, "transformer") != before
    assert nf4_cache.cache_key(source, "text_encoder_2") == t5_before  # only the changed component
    after_size = nf4_cache.cache_key(source, "transformer")
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert nf4_cache.cache_key(source, "transformer") != after_size


def test_key_follows_symlinks_so_shared_components_share_an_entry(tmp_path):
    _folder(tmp_path / "schnell")
    kontext = tmp_path / "kontext"
    kontext.mkdir()
    (kontext / "transformer").symlink_to(tmp_path / "schnell" / "transformer", target_is_directory=True)
    a = nf4_cache.cache_key(ModelSource("flux-schnell", path=tmp_path / "schnell"), "transformer")
    b = nf4_cache.cache_key(ModelSource("flux-kontext", path=kontext), "transformer")
    assert a == b


def test_no_key_without_files(tmp_path):
    assert nf4_cache.cache_key(ModelSource("x", path=tmp_path / "missing"), "transformer") is None
    assert nf4_cache.cache_key(ModelSource("x", repo="org/not-downloaded", revision="main"), "transformer") is None


def test_cache_only_for_nf4_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv(nf4_cache.ENV, str(tmp_path))

    def lc(name, quantization):
        return LoadContext(None, Device(name, quantization), lambda key: ModelSource(key))

    assert nf4_cache.cache_dir(lc("cuda", "nf4")) == tmp_path
    assert nf4_cache.cache_dir(lc("cuda", "bf16")) is None
    assert nf4_cache.cache_dir(lc("cpu", "fp32")) is None
    monkeypatch.delenv(nf4_cache.ENV)
    assert nf4_cache.cache_dir(lc("cuda", "nf4")) is None


@pytest.fixture
def bnb_on_cpu(monkeypatch):
    """Let diffusers' bitsandbytes 4-bit quantizer load onto the CPU (it insists on CUDA)."""
    pytest.importorskip("bitsandbytes")
    try:
        from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer
    except ImportError:
        pytest.skip("diffusers has no bitsandbytes quantizer")
    monkeypatch.setattr(BnB4BitDiffusersQuantizer, "validate_environment", lambda self, *a, **k: None)
    monkeypatch.setattr(BnB4BitDiffusersQuantizer, "update_device_map",
                        lambda self, device_map: device_map if device_map is not None else {"": "cpu"})


@pytest.mark.slow
def test_first_load_writes_the_cache_later_loads_use_it_and_a_changed_source_replaces_it(tmp_path, monkeypatch,
                                                                                         bnb_on_cpu):
    from diffusers import FluxPipeline

    from paletta_server.engines.tiny.flux import build_schnell

    model = tmp_path / "flux-schnell"
    build_schnell(model)
    cache = tmp_path / "cache"
    monkeypatch.setenv(nf4_cache.ENV, str(cache))
    source = ModelSource("flux-schnell", path=model)
    lc = LoadContext(None, Device("cuda", "nf4"), lambda key: source)
    nf4_cache.stats.clear()

    first = flux.from_pretrained(FluxPipeline, source, lc)
    assert nf4_cache.stats["writes"] == 2 and nf4_cache.stats["hits"] == 0
    entries = sorted(p.name for p in cache.iterdir())
    assert [e.split("-")[0] for e in entries] == ["text_encoder_2", "transformer"]

    second = flux.from_pretrained(FluxPipeline, source, lc)
    assert nf4_cache.stats["hits"] == 2 and nf4_cache.stats["writes"] == 2
    for name in ("transformer", "text_encoder_2"):
        assert getattr(second, name).hf_quantizer is not None  # loaded already quantized
    a = first.transformer.transformer_blocks[0].attn.to_q.weight
    b = second.transformer.transformer_blocks[0].attn.to_q.weight
    assert type(b).__name__ == "Params4bit" and b.data.equal(a.data)

    weights = next((model / "transformer").glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    flux.from_pretrained(FluxPipeline, source, lc)
    assert nf4_cache.stats["hits"] == 3 and nf4_cache.stats["writes"] == 3  # T5 reused, transformer redone
    after = sorted(p.name for p in cache.iterdir())
    assert len(after) == 2 and after != entries and set(after) & set(entries) == {entries[0]}


@pytest.mark.slow
def test_an_offloaded_load_reads_cached_components_one_at_a_time(tmp_path, monkeypatch, bnb_on_cpu):
    """Loading for model CPU offload holds one NF4 component on the device at a time, cached ones too
    (bitsandbytes places a cached checkpoint on the GPU): each is read, moved to the CPU and the device
    memory freed before the next is read."""
    from diffusers import FluxPipeline

    from paletta_server.engines import common
    from paletta_server.engines.tiny.flux import build_schnell

    model = tmp_path / "flux-schnell"
    build_schnell(model)
    monkeypatch.setenv(nf4_cache.ENV, str(tmp_path / "cache"))
    source = ModelSource("flux-schnell", path=model)
    lc = LoadContext(None, Device("cuda", "nf4"), lambda key: source, offload=True)
    nf4_cache.stats.clear()
    flux._load_on_cpu(FluxPipeline, source, lc, None)
    assert nf4_cache.stats["writes"] == 2

    events: list[object] = []
    real_load = nf4_cache.load
    monkeypatch.setattr(nf4_cache, "load", lambda root, src, components, lc: (
        events.append(("read", *components)), real_load(root, src, components, lc))[1])
    monkeypatch.setattr(common, "free_device_memory", lambda: events.append("free"))
    pipe = flux._load_on_cpu(FluxPipeline, source, lc, None)
    assert events == [("read", "transformer"), "free", ("read", "text_encoder_2"), "free"]
    assert nf4_cache.stats["hits"] == 2 and nf4_cache.stats["writes"] == 2
    assert pipe.transformer.hf_quantizer is not None and pipe.transformer.device.type == "cpu"
