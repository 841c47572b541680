"""The turbo profile: float8 where the GPU and libraries allow (else bf16, said why), and the
transformer's repeated blocks compiled with torch.compile, their code cached in the data dir.

float8 needs an Ada / Hopper GPU, so here its choice and its loading configuration are checked;
compilation runs for real on the CPU through the server (turbo on a machine without a GPU is fp32 +
compile), on the tiny folders the tiny profile builds, and must give the tiny profile's pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from paletta.v1 import generate_pb2 as gen
from paletta.v1 import generate_service_pb2_grpc as gen_grpc
from paletta.v1 import image_pb2
from paletta.v1 import system_service_pb2 as system
from paletta.v1 import system_service_pb2_grpc as system_grpc
from paletta_server.models.profiles import PROFILES
from paletta_server.models.types import Device, LoadContext, ModelSource
from tests.helpers import collect, download_image


class FakeNvml:
    def __init__(self, capability: tuple[int, int]):
        self.capability = capability

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802 (NVML's names)
        return index

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:  # noqa: N802
        return self.capability


@pytest.mark.parametrize(("capability", "torchao", "quantization", "reason"), [
    ((9, 0), True, "float8", ""),  # Hopper
    ((8, 9), True, "float8", ""),  # Ada
    ((10, 0), True, "float8", ""),  # Blackwell
    ((8, 6), True, "bf16", "compute capability 8.9+ (this GPU: 8.6)"),  # Ampere: no float8 tensor cores
    ((9, 0), False, "bf16", "float8 needs torchao"),
])
def test_turbo_takes_float8_only_where_the_gpu_and_libraries_can(monkeypatch, capability, torchao, quantization,
                                                                 reason):
    from paletta_server.models import device as device_module

    monkeypatch.setattr(device_module, "_nvml", lambda: FakeNvml(capability))
    monkeypatch.setattr(device_module, "_has_torchao", lambda: torchao)
    device = device_module.detect_device(PROFILES["turbo"])
    assert (device.name, device.quantization) == ("cuda", quantization)
    assert (reason in device.note) if reason else device.note == ""
    assert str(device.dtype) == "torch.bfloat16"


def test_float8_needs_torchao_to_import_not_only_to_be_installed(monkeypatch):
    """A torchao built for another torch is installed but does not import: bf16 then, not failing jobs."""
    pytest.importorskip("torchao")
    import sys

    from paletta_server.models import device as device_module

    assert device_module._has_torchao()
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # an import that fails
    assert not device_module._has_torchao()


def test_turbo_without_a_gpu_runs_fp32_and_says_so(monkeypatch):
    from paletta_server.models import device as device_module

    monkeypatch.setattr(device_module, "_nvml", lambda: None)
    device = device_module.detect_device(PROFILES["turbo"])
    assert (device.name, device.quantization) == ("cpu", "fp32") and "float8 needs CUDA" in device.note
    assert PROFILES["turbo"].compile and not PROFILES["fast"].compile


def test_float8_quantizes_only_the_transformer_with_torchao():
    pytest.importorskip("torchao")  # the dev extra has it: CI runs this
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    from paletta_server.engines import flux

    def context(quantization: str) -> LoadContext:
        return LoadContext(PROFILES["turbo"], Device("cuda", quantization), lambda key: ModelSource(key))

    source = ModelSource("flux-schnell", path=Path("/models/schnell"))
    config = flux.pretrained_kwargs(source, context("float8"))["quantization_config"]
    assert list(config.quant_mapping) == ["transformer"]  # T5 stays bf16
    quant_type = config.quant_mapping["transformer"].quant_type
    assert isinstance(quant_type, Float8DynamicActivationFloat8WeightConfig)
    assert all(isinstance(g, PerRow) for g in quant_type.granularity)
    # Qwen asks for its transformer and text encoder: float8 takes the transformer only; NF4 both.
    qwen = flux.pretrained_kwargs(source, context("float8"), ["transformer", "text_encoder"])
    assert list(qwen["quantization_config"].quant_mapping) == ["transformer"]
    nf4 = flux.pretrained_kwargs(source, context("nf4"), ["transformer", "text_encoder"])
    assert nf4["quantization_config"].components_to_quantize == ["transformer", "text_encoder"]
    assert "quantization_config" not in flux.pretrained_kwargs(source, context("bf16"))
    # The ControlNet, loaded on its own, takes the same float8 settings.
    controlnet = flux.component_quantization(context("float8"))
    assert type(controlnet).__name__ == "TorchAoConfig"
    assert isinstance(controlnet.quant_type, Float8DynamicActivationFloat8WeightConfig)
    assert flux.component_quantization(context("bf16")) is None


def test_float8_footprints_lie_between_nf4_and_bf16():
    from paletta_server.models import memory

    for key in ("flux-schnell", "flux-controlnet-union", "qwen-image-edit"):
        nf4, f8, bf16 = (memory.estimate(key, q) for q in ("nf4", "float8", "bf16"))
        assert nf4.weights < f8.weights < bf16.weights and nf4.offload_peak < f8.offload_peak < bf16.offload_peak


def test_float8_weights_are_measured_at_one_byte_a_weight_plus_their_scales(monkeypatch):
    """torchao's float8 tensor says bfloat16 (the dtype it stands for); the residency manager must
    count its float8 data and per-row scales, or a turbo model would look twice its size."""
    pytest.importorskip("torchao")
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    from paletta_server.engines.common import measure_bytes

    layer = torch.nn.Linear(512, 256).to(torch.bfloat16)
    assert measure_bytes(layer) == (256 * 512 + 256) * 2
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)  # torchao's hardware check, on a CPU
    quantize_(layer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    assert layer.weight.dtype == torch.bfloat16  # what it reports
    assert measure_bytes(layer) == 256 * 512 * 1 + 256 * 4 + 256 * 2  # float8 data, fp32 row scales, bf16 bias


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


async def _generate(handle, **fields) -> tuple[np.ndarray, list]:
    stub = gen_grpc.GenerateServiceStub(handle.channel)
    events = await collect(stub.Generate(gen.GenerateRequest(prompt="a lighthouse", width=128, height=96, steps=2,
                                                             seed=11, **fields)))
    output = next(e.output for e in events if e.HasField("output"))
    return _pixels(await download_image(handle.channel, output.asset.name)), events


async def test_turbo_compiles_the_blocks_gives_the_same_pixels_and_reuses_its_cache(
        server_factory, tiny_models_dir, tmp_path, monkeypatch):
    import torch
    from torch._dynamo.utils import counters

    from paletta_server.engines import turbo

    style = {"styles": [image_pb2.StyleSelection(name="mine", weight=2.0)]}
    (tmp_path / "tiny-data").mkdir()
    (tmp_path / "tiny-data" / "styles.toml").write_text('[mine]\npath = "unused-under-tiny.safetensors"\n')
    tiny = await server_factory(data_dir=tmp_path / "tiny-data")
    expected, _ = await _generate(tiny)
    expected_styled, _ = await _generate(tiny, **style)
    lora = tiny_models_dir / "styles" / "mine.safetensors"
    assert lora.exists()

    # turbo on the same folders (as a user's local folders), its compile cache in its own data dir
    monkeypatch.setenv("PALETTA_MODEL_FLUX_SCHNELL", str(tiny_models_dir / "flux-schnell"))
    monkeypatch.delenv(turbo.CACHE_ENV, raising=False)
    data = tmp_path / "turbo-data"
    data.mkdir()
    (data / "styles.toml").write_text(f'[mine]\npath = "{lora}"\n')
    torch._dynamo.reset()
    counters.clear()
    fast = await server_factory(data_dir=data, profile="turbo")
    status = await system_grpc.SystemServiceStub(fast.channel).GetStatus(system.GetStatusRequest())
    assert status.profile == "turbo" and status.quantization.startswith("fp32 (float8 needs CUDA")
    pixels, events = await _generate(fast)
    pipe = fast.app.residency.ensure_resident("flux-schnell")
    assert turbo.is_compiled(pipe)
    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert counters["inductor"]["fxgraph_cache_miss"] > 0  # compiled here, first time
    assert np.abs(pixels - expected).max() <= 1  # compiled fp32 = eager fp32 (a rounding step at most)
    cache = data / "cache" / "torchinductor"
    assert Path(turbo.os.environ[turbo.CACHE_ENV]) == cache and any(cache.rglob("*.py"))
    styled, _ = await _generate(fast, **style)  # a LoRA on compiled blocks
    # the LoRA is applied: eager's styled pixels, and further from the unstyled ones than compiling moves them
    assert np.abs(styled - expected_styled).max() <= 1 and np.abs(styled - pixels).max() > 1
    await fast.server.stop(0.5)
    fast.app.residency.unload()

    # a restart on the same data dir compiles from the cache: no inductor run, same pixels
    torch._dynamo.reset()
    counters.clear()
    again = await server_factory(data_dir=data, profile="turbo")
    pixels_again, _ = await _generate(again)
    assert counters["inductor"]["fxgraph_cache_hit"] > 0 and counters["inductor"]["fxgraph_cache_miss"] == 0
    assert np.array_equal(pixels_again, pixels)
