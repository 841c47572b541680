"""Which device runs models, decided without importing torch (NVML), and GPU statistics."""

from __future__ import annotations

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


def detect_device(profile: Profile) -> Device:
    """CUDA when a GPU is visible; otherwise NF4/bf16 fall back to fp32 on CPU with a stated reason."""
    if _nvml() is not None:
        return Device("cuda", profile.quantization)
    if profile.quantization == "fp32":
        return Device("cpu", "fp32")
    return Device("cpu", "fp32", note=f"{profile.quantization} needs CUDA; no GPU found, running fp32 on CPU")


def describe(device: Device) -> str:
    """"cuda:0 (NVIDIA H100 …)" or "cpu"."""
    if device.name != "cuda":
        return "cpu"
    stats = gpu_stats()
    return f"cuda:0 ({stats.name})" if stats else "cuda:0"


def gpu_stats() -> Any | None:
    """GpuStats from NVML for GPU 0, or None without a GPU."""
    nvml = _nvml()
    if nvml is None:
        return None
    from paletta.v1 import system_service_pb2

    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    name = nvml.nvmlDeviceGetName(handle)
    return system_service_pb2.GpuStats(
        name=name.decode() if isinstance(name, bytes) else name,
        memory_total_bytes=memory.total, memory_used_bytes=memory.used,
        utilization_percent=nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
        power_watts=nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        temperature_celsius=nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
    )


def budget_function(device: Device, cpu_budget: int, cuda_reserve: int):
    """budget(used_by_us): configured bytes on CPU; on CUDA what is free now plus what we hold, less a reserve."""
    if device.name != "cuda":
        return lambda used: cpu_budget

    def cuda_budget(used: int) -> int:
        import torch

        free, _total = torch.cuda.mem_get_info()
        return max(0, free + used - cuda_reserve)

    return cuda_budget
