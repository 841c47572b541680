"""Composition root: builds the store, assets, registry, residency, job manager and worker from a Config."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from paletta_server.capabilities import discover
from paletta_server.capabilities.base import Capability, PrepareContext
from paletta_server.config import Config
from paletta_server.jobs.manager import JobManager
from paletta_server.jobs.runner import DeviceWorker
from paletta_server.jobs.store import JobStore
from paletta_server.models.device import budget_function, detect_device, device_capacity
from paletta_server.models.profiles import PROFILES, Profile
from paletta_server.models.registry import ModelRegistry
from paletta_server.models.residency import ResidencyManager
from paletta_server.models.styles import StyleRegistry
from paletta_server.models.types import Device
from paletta_server.storage import AssetStore


@dataclass
class PalettaApp:
    config: Config
    device: Device | None = None
    profile: Profile = field(init=False)

    def __post_init__(self) -> None:
        config = self.config
        self.profile = PROFILES[config.profile]
        self.device = self.device or detect_device(self.profile)
        self.store = JobStore(config.db_path)
        self.assets = AssetStore(config.assets_dir, config.max_upload_bytes, config.max_image_pixels)
        self.registry = ModelRegistry(config)
        self.styles = StyleRegistry(config.data_dir)
        memory = (config.cpu_memory_budget_bytes, config.cuda_reserve_bytes, config.memory_budget)
        self.residency = ResidencyManager(
            self.registry, self.device, budget_function(self.device, *memory),
            cap=config.memory_budget, capacity=device_capacity(self.device, *memory),
        )
        # The inference edge the memory budget allows (never above the profile's own).
        self.profile = replace(self.profile, max_inference_edge=self.residency.policy.inference_edge)
        self.capabilities: dict[str, Capability] = discover()
        self.manager = JobManager(self.store, self.assets, max_queue=config.max_queue,
                                  lookahead=config.affinity_lookahead, max_skips=config.max_skips)
        self.worker = DeviceWorker(self.manager, self.capabilities, self.residency, self.assets, config,
                                   self.profile, self.styles)
        self.prepare_context = PrepareContext(self.assets, self.profile, config, self.styles)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Recover persisted jobs and start the device worker; call from the serving loop."""
        self.manager.start(loop)
        self.worker.start()

    def stop(self, worker_wait: float = 5.0) -> None:
        """Stop the worker (a running job stops at its next step), then store what it already
        reported (outputs included)."""
        self.worker.stop(worker_wait)
        self.manager.stop()
