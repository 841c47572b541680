"""Registry sources and overrides, residency (measured bytes, LRU eviction, pins), lazy torch."""

import subprocess
import sys
from pathlib import Path

import pytest

from paletta_server.config import load_config
from paletta_server.models.registry import ModelRegistry, ModelSpec, env_var
from paletta_server.models.residency import ResidencyManager
from paletta_server.models.types import Device

MB = 1024 * 1024


def linear_of(megabytes: int):
    def load(source, lc):
        import torch

        return torch.nn.Linear(megabytes * MB // 4, 1, bias=False)  # fp32: 4 bytes a weight

    return load


@pytest.fixture
def residency(tmp_path, monkeypatch):
    config = load_config(tmp_path, env={}, profile="quality", cpu_memory_budget_bytes=10 * MB)
    registry = ModelRegistry(config, env={})
    sizes = dict(zip("abc", (4, 4, 5), strict=True))
    registry.specs = {k: ModelSpec(k, f"test/{k}", f"tests.test_models:_load_{k}", "",
                                   estimated_bytes=sizes[k] * MB) for k in "abc"}
    for key, size in sizes.items():
        monkeypatch.setattr(sys.modules[__name__], f"_load_{key}", linear_of(size), raising=False)
    return ResidencyManager(registry, Device("cpu", "fp32"), lambda used: 10 * MB)


def test_measures_bytes_and_evicts_least_recently_used(residency):
    events = []
    residency.ensure_resident("a", lambda *e: events.append(e))
    residency.ensure_resident("b")
    assert dict(residency.snapshot()) == {"a": 4 * MB, "b": 4 * MB}
    residency.ensure_resident("a")  # a is now most recently used
    residency.ensure_resident("c", lambda *e: events.append(e))
    assert dict(residency.snapshot()) == {"a": 4 * MB, "c": 5 * MB}
    assert events == [("loading", "a", 0), ("loading", "a", 1), ("evicting", "b", 0), ("evicting", "b", 1),
                      ("loading", "c", 0), ("loading", "c", 1)]
    assert residency.load_counts == {"a": 1, "b": 1, "c": 1}


def test_unknown_size_is_measured_then_made_room_for(residency):
    residency.registry.specs["c"] = residency.registry.specs["c"].__class__(
        "c", "test/c", "tests.test_models:_load_c", "", estimated_bytes=0)
    residency.ensure_resident("a")
    residency.ensure_resident("b")
    residency.ensure_resident("c")  # 4 + 4 + 5 > 10: the least recently used goes after the load
    assert dict(residency.snapshot()) == {"b": 4 * MB, "c": 5 * MB}


def test_pinned_models_are_not_evicted_or_unloaded(residency):
    residency.ensure_resident("a")
    residency.ensure_resident("b")
    residency.pin({"a"})
    residency.ensure_resident("c")
    assert "a" in dict(residency.snapshot()) and "b" not in dict(residency.snapshot())
    unloaded, freed = residency.unload()
    assert unloaded == ["c"] and freed == 5 * MB
    residency.pin(set())
    assert residency.unload() == (["a"], 4 * MB)


def test_registry_sources_and_overrides(tmp_path):
    (tmp_path / "paletta.toml").write_text(
        '[models.flux-fill]\npath = "/weights/fill"\n[models.clipseg]\nrevision = "abc123"\n')
    config = load_config(tmp_path, env={})
    registry = ModelRegistry(config, env={env_var("flux-schnell"): "/weights/schnell"})
    assert registry.source("flux-schnell").path == Path("/weights/schnell")
    assert registry.source("flux-fill").path == Path("/weights/fill")
    clipseg = registry.source("clipseg")
    assert (clipseg.repo, clipseg.revision, clipseg.path) == ("CIDAS/clipseg-rd64-refined", "abc123", None)
    assert registry.source("owlv2").describe() == "google/owlv2-base-patch16-ensemble@main"
    tiny = ModelRegistry(load_config(tmp_path, env={}, profile="tiny"), env={})
    assert tiny.source("flux-schnell").path == tmp_path / "models" / "tiny" / "flux-schnell"
    assert "PALETTA_MODEL_FLUX_SCHNELL" in registry.how_to_provide("flux-schnell")


def test_config_precedence(tmp_path):
    (tmp_path / "paletta.toml").write_text('port = 6000\nprofile = "quality"\nmax_queue = 9\n')
    config = load_config(tmp_path, env={"PALETTA_PORT": "7000"}, max_queue=3)
    assert (config.port, config.profile, config.max_queue) == (7000, "quality", 3)
    with pytest.raises(ValueError, match="unknown profile"):
        load_config(tmp_path, env={}, profile="warp")
    with pytest.raises(ValueError, match="preview_every must be at least 1"):
        load_config(tmp_path, env={}, preview_every=0)


def test_fast_profile_without_cuda_falls_back_loudly(monkeypatch):
    from paletta_server.models import device as device_module
    from paletta_server.models.profiles import PROFILES

    monkeypatch.setattr(device_module, "_nvml", lambda: None)  # as on a machine without a GPU
    device = device_module.detect_device(PROFILES["fast"])
    assert (device.name, device.quantization) == ("cpu", "fp32") and "nf4 needs CUDA" in device.note


def test_a_gpu_asked_for_by_name_is_never_the_cpu(monkeypatch, tmp_path):
    from paletta_server.app import choose_device
    from paletta_server.models import device as device_module
    from paletta_server.models.profiles import PROFILES

    monkeypatch.setattr(device_module, "_nvml", lambda: None)  # as on a machine without a GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after: cuda:N sets it
    for wanted in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(ValueError, match=f"--device {wanted}: no such CUDA GPU"):
            choose_device(load_config(tmp_path, env={}, device=wanted), PROFILES["fast"])
    assert choose_device(load_config(tmp_path, env={}, device="cpu"), PROFILES["fast"]).name == "cpu"
    assert choose_device(load_config(tmp_path, env={}), PROFILES["fast"]).name == "cpu"  # detected: falls back


def test_booting_the_server_imports_no_torch(tmp_path):
    code = (
        "import asyncio, sys\n"
        "from paletta_server.config import load_config\n"
        "from paletta_server.server import PalettaServer\n"
        "async def main():\n"
        f"    s = PalettaServer(load_config({str(tmp_path)!r}, env={{}}, profile='tiny', port=0))\n"
        "    await s.start()\n"
        "    await s.stop(0)\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_partial_files_of_a_crash_are_removed_on_start(tmp_path):
    from paletta_server.storage import AssetStore

    store = AssetStore(tmp_path, 1 << 20, 1 << 20)
    kept = store.put_image(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (8, 8)))
    (tmp_path / ".upload-abc").write_bytes(b"half an upload")
    (tmp_path / kept.name[7:9] / ".tmp-xyz").write_bytes(b"half a write")
    AssetStore(tmp_path, 1 << 20, 1 << 20)
    assert not list(tmp_path.rglob(".upload-*")) and not list(tmp_path.rglob(".tmp-*"))
    assert AssetStore(tmp_path, 1 << 20, 1 << 20).get(kept.name) == kept

