"""Which device runs models, decided without importing torch (NVML), and GPU statistics."""

from __future__ import annotations

import os
from typing import Any

from paletta_server.models.profiles import Profile
from paletta_server.models.types import Device


def _nvml() -> Any | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml if pynvml.nvmlDeviceGetCount() > 0 else None
    except Exception:  # no driver, no library, no GPU: all mean "no GPU"
        return None


def visible_gpu(value: str | None) -> int | str | None:
    """The GPU this process computes on, as NVML names it, from CUDA_VISIBLE_DEVICES (``value``):
    its first entry, an index or a ``GPU-…`` / ``MIG-…`` UUID; 0 when unset; None when the variable
    hides every GPU ("" or a negative index). NVML itself ignores the variable and counts every GPU
    in PCI bus order (CUDA's order too with CUDA_DEVICE_ORDER=PCI_BUS_ID)."""
    if value is None:
        return 0
    first = value.split(",")[0].strip()
    if not first:
        return None
    try:
        index = int(first)
    except ValueError:
        return first
    return index if index >= 0 else None


def _gpu() -> tuple[Any, Any] | None:
    """(NVML, handle of the GPU this process uses), or None when it has none."""
    nvml = _nvml()
    which = visible_gpu(os.environ.get("CUDA_VISIBLE_DEVICES"))
    if nvml is None or which is None:
        return None
    try:
        if isinstance(which, int):
            return nvml, nvml.nvmlDeviceGetHandleByIndex(which)
        return nvml, nvml.nvmlDeviceGetHandleByUUID(which)
    except Exception:  # an index or UUID NVML does not know: CUDA sees no GPU either
        return None


def detect_device(profile: Profile) -> Device:
    """CUDA when a GPU is visible; otherwise NF4/bf16 fall back to fp32 on CPU with a stated reason."""
    gpu = _gpu()
    if gpu is not None:
        nvml, handle = gpu
        if profile.quantization == "float8":
            return cuda_float8(tuple(nvml.nvmlDeviceGetCudaComputeCapability(handle)), _has_torchao())
        return Device("cuda", profile.quantization)
    if profile.quantization == "fp32":
        return Device("cpu", "fp32")
    return Device("cpu", "fp32", note=f"{profile.quantization} needs CUDA; no GPU found, running fp32 on CPU")


# float8 matrix products (torch._scaled_mm, torchao's dynamic float8) need Ada (8.9) or Hopper (9.0)+.
FLOAT8_CAPABILITY = (8, 9)


def cuda_float8(capability: tuple[int, int], torchao: bool) -> Device:
    """The turbo profile's device on a GPU of this compute capability: float8 where the card and the
    installed libraries can, else bf16 with the reason (torch.compile applies either way)."""
    if capability < FLOAT8_CAPABILITY:
        return Device("cuda", "bf16", note=f"float8 needs compute capability 8.9+ (this GPU: "
                                           f"{capability[0]}.{capability[1]}); running bf16")
    if not torchao:
        return Device("cuda", "bf16", note="float8 needs torchao importable with this torch "
                                           "(pip install 'paletta[turbo]'); running bf16")
    return Device("cuda", "float8")


def _has_torchao() -> bool:
    """Whether torchao's float8 recipe imports here (installed, and built for this torch); imports torch,
    which only the turbo profile on a GPU pays at start."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow  # noqa: F401
    except Exception:  # absent, or built against another torch
        return False
    return True


def describe(device: Device) -> str:
    """"cuda:0 (NVIDIA H100 …)" or "cpu"."""
    if device.name != "cuda":
        return "cpu"
    stats = gpu_stats()
    return f"cuda:0 ({stats.name})" if stats else "cuda:0"


def gpu_stats() -> Any | None:
    """GpuStats from NVML for the GPU this process uses, or None without a GPU."""
    gpu = _gpu()
    if gpu is None:
        return None
    from paletta.v1 import system_service_pb2

    nvml, handle = gpu
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    name = nvml.nvmlDeviceGetName(handle)
    return system_service_pb2.GpuStats(
        name=name.decode() if isinstance(name, bytes) else name,
        memory_total_bytes=memory.total, memory_used_bytes=memory.used,
        utilization_percent=nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
        power_watts=nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        temperature_celsius=nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
    )


# Under a memory cap the allocator's fragmentation is kept out of the plan (activations are in it).
CAP_MARGIN = 256 * 1024**2
_cap_applied = 0


def apply_memory_cap(cap: int) -> float | None:
    """Cap this process's CUDA allocations at ``cap`` bytes, once, at first CUDA use:
    ``torch.cuda.set_per_process_memory_fraction(cap / total)``, so an 80+ GB GPU fails where a card
    of ``cap`` bytes would. Returns the fraction set, or None (no cap, no CUDA, already set)."""
    global _cap_applied
    if cap <= 0 or _cap_applied == cap:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, cap / total)
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    _cap_applied = cap
    return fraction


def release_memory_cap() -> None:
    """Lift the cap again (the GPU benchmark runs capped and uncapped servers in one process)."""
    global _cap_applied
    if _cap_applied:
        import torch

        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        _cap_applied = 0


def budget_function(device: Device, cpu_budget: int, cuda_reserve: int, cap: int = 0):
    """budget(used_by_us): the bytes models and one job's activations may use.

    With a cap: the cap (less CAP_MARGIN on CUDA, where it is enforced at first use). Without: the
    configured bytes on CPU; on CUDA what is free now plus what we hold, less a reserve. Free counts
    the blocks torch's caching allocator keeps reserved but unused (a finished job's activations):
    CUDA reports them as used, yet they are ours to reuse."""
    if device.name != "cuda":
        return lambda used: cap or cpu_budget

    def cuda_budget(used: int) -> int:
        import torch

        if cap:
            apply_memory_cap(cap)
            return max(0, cap - CAP_MARGIN)
        free, _total = torch.cuda.mem_get_info()
        cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        return max(0, free + cached + used - cuda_reserve)

    return cuda_budget


def device_capacity(device: Device, cpu_budget: int, cuda_reserve: int, cap: int = 0) -> int:
    """The budget with nothing loaded, known at start without torch (NVML): what the inference edge
    and the two-family rule are derived from. 0 when unknown."""
    if cap:
        return max(0, cap - (CAP_MARGIN if device.name == "cuda" else 0))
    if device.name != "cuda":
        return cpu_budget
    gpu = _gpu()
    if gpu is None:
        return 0
    nvml, handle = gpu
    total = nvml.nvmlDeviceGetMemoryInfo(handle).total
    return max(0, total - cuda_reserve)
