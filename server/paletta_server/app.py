"""Composition root: builds the store, assets, registry, residency, job manager and worker from a Config.

Embedded (the default): SQLite in the data dir, the manager is the in-process worker's link.
Shared (``database`` is a PostgreSQL URL): the same manager records against the shared store; a
``workers=1`` process runs its device worker through a PostgresLink, a ``workers=0`` front end
runs none, and ``paletta worker`` processes (main.worker) run one each.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from filelock import FileLock, Timeout

from paletta_server.capabilities import discover
from paletta_server.capabilities.base import Capability, PrepareContext
from paletta_server.config import Config
from paletta_server.jobs import messages as msg
from paletta_server.jobs.manager import JobManager
from paletta_server.jobs.runner import DeviceWorker
from paletta_server.jobs.store import JobStore, database_url
from paletta_server.models.device import budget_function, detect_device, device_capacity
from paletta_server.models.profiles import PROFILES, Profile
from paletta_server.models.registry import ModelRegistry
from paletta_server.models.residency import ResidencyManager
from paletta_server.models.styles import StyleRegistry
from paletta_server.models.types import Device
from paletta_server.storage import AssetStore


def choose_device(config: Config, profile: Profile) -> Device:
    """``config.device``: "" detects; "cpu" forces the CPU; "cuda:N" is GPU N, which this process
    sees as its only GPU (CUDA_VISIBLE_DEVICES, set before torch loads)."""
    wanted = config.device.strip().lower()
    if wanted == "cpu":
        return Device("cpu", "fp32", note="" if profile.quantization == "fp32" else "--device cpu: running fp32")
    if wanted.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = wanted.split(":", 1)[1]
    elif wanted not in ("", "cuda"):
        raise ValueError(f"unknown device {config.device!r}; use cpu, cuda or cuda:N")
    device = detect_device(profile)
    if wanted and device.name != "cuda":  # asked for a GPU by name: never run on the CPU instead
        raise ValueError(f"--device {config.device}: no such CUDA GPU is visible; use --device cpu, or leave "
                         "--device out to use a GPU when there is one")
    return device


def _lock_sqlite(database: Path) -> FileLock:
    """Hold ``<database>.lock`` for this process, or refuse: another server uses that store."""
    database.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(database.with_name(database.name + ".lock"), thread_local=False)  # any thread releases it
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(f"the job store {database} is in use by another Paletta server; stop it, or give this "
                         "one another --data-dir (or share a PostgreSQL store: --database)") from None
    return lock


def open_store(url: str) -> tuple[JobStore, FileLock | None]:
    """The job store at ``url`` and, for SQLite, its lock: an embedded store belongs to one server (a
    second would "recover" the first's running jobs as interrupted and run its queue again);
    PostgreSQL is shared by design. Refused in one line: in use, bad URL, no driver, no server."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    lock = None
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            lock = _lock_sqlite(Path(parsed.database).resolve())
        return JobStore(url), lock
    except (SQLAlchemyError, ImportError) as exc:
        if lock is not None:
            lock.release()
        reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"cannot open the job store {_without_password(url)}: {type(exc).__name__}: "
                         f"{reason}") from None
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL: say so, without echoing what may hold a password
        return "(unparsable database URL)"


@dataclass
class PalettaApp:
    config: Config
    device: Device | None = None
    profile: Profile = field(init=False)

    def __post_init__(self) -> None:
        config = self.config
        self.profile = PROFILES[config.profile]
        self.store, self._store_lock = open_store(database_url(config.database, config.data_dir))
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        config = self.config
        if config.workers not in (0, 1):
            raise ValueError(f"workers must be 0 or 1 per process, got {config.workers}: run `paletta worker` per GPU")
        if config.workers == 0 and not self.store.shared:
            raise ValueError("a front end without workers (--workers 0) needs a shared PostgreSQL store (--database)")
        self.device = self.device or choose_device(config, self.profile)
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
                                  lookahead=config.affinity_lookahead, max_skips=config.max_skips,
                                  lease_seconds=config.lease_seconds)
        self.link: msg.WorkerLink = self.manager
        if self.store.shared:
            from paletta_server.jobs.postgres import PostgresLink, worker_name

            self.link = PostgresLink(self.manager, worker_name(config.device or self.device.name))
        self.worker = (DeviceWorker(self.link, self.capabilities, self.residency, self.assets, config,
                                    self.profile, self.styles) if config.workers else None)
        self.prepare_context = PrepareContext(self.assets, self.profile, config, self.styles)

    def start(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Recover persisted jobs (embedded) and start the device worker; call from the serving loop
        (None in a worker process, which serves no watchers)."""
        self.manager.start(loop)
        if self.worker is not None:
            if self.link is not self.manager:
                self.link.start()  # type: ignore[attr-defined]
            self.worker.start()

    def stop(self, worker_wait: float = 5.0) -> None:
        """Stop the worker (a running job stops at its next step), then store what it already
        reported (outputs included)."""
        if self.worker is not None:
            self.worker.stop(worker_wait)
        self.manager.stop()
        if self.worker is not None and self.link is not self.manager:
            self.link.stop()  # type: ignore[attr-defined]
        self.store.dispose()

    def close(self) -> None:
        """Let the store go (its lock too): after ``stop`` and the last call, or after a failed start."""
        self.store.dispose()
        if self._store_lock is not None:
            self._store_lock.release()
