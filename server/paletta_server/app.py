"""Composition root: builds the store, assets, registry, residency, job manager and worker from a Config."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from paletta_server.capabilities import discover
from paletta_server.capabilities.base import Capability, PrepareContext
from paletta_server.config import Config
from paletta_server.engines.common import Device
from paletta_server.jobs.manager import JobManager
from paletta_server.jobs.runner import DeviceWorker
from paletta_server.jobs.store import JobStore
from paletta_server.models.device import budget_function, detect_device
from paletta_server.models.profiles import PROFILES, Profile
from paletta_server.models.registry import ModelRegistry
from paletta_server.models.residency import ResidencyManager
from paletta_server.models.styles import StyleRegistry
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
        self.residency = ResidencyManager(
            self.registry, self.device,
            budget_function(self.device, config.cpu_memory_budget_bytes, config.cuda_reserve_bytes),
        )
        self.capabilities: dict[str, Capability] = discover()
        self.manager = JobManager(
            self.store, self.capabilities, max_queue=config.max_queue, lookahead=config.affinity_lookahead,
            max_skips=config.max_skips, is_resident=self.residency.is_resident,
        )
        self.worker = DeviceWorker(self.manager, self.capabilities, self.residency, self.assets, config,
                                   self.profile, self.styles)
        self.prepare_context = PrepareContext(self.assets, self.profile, config, self.styles)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Recover persisted jobs and start the device worker; call from the serving loop."""
        self.manager.loop = loop
        self.manager.recover()
        self.worker.start()

    def stop(self, worker_wait: float = 5.0) -> None:
        self.worker.stop(worker_wait)
