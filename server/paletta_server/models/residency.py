"""Residency manager: loads models lazily, measures them, evicts least recently used to fit a budget.

Only the device worker loads models; ``unload`` may come from any thread, so a lock guards the
table, and models the running job uses are pinned against eviction and unloading.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paletta_server.errors import ModelUnavailable, PalettaError
from paletta_server.models.registry import ModelRegistry
from paletta_server.models.types import LoadContext, ModelSource

# stage, model key, done (0 = started, 1 = finished)
LoadListener = Callable[[str, str, int], None]


@dataclass
class Resident:
    key: str
    obj: Any
    bytes: int
    last_used: float


class ResidencyManager:
    def __init__(self, registry: ModelRegistry, device: Any, budget: Callable[[int], int]):
        """``budget(used_by_us)`` returns the bytes models may use in total (see server wiring)."""
        self.registry = registry
        self.device = device
        self._budget = budget
        self._resident: OrderedDict[str, Resident] = OrderedDict()
        self._pinned: set[str] = set()
        self._measured: dict[str, int] = {}
        self._lock = threading.RLock()
        self._build_lock = threading.Lock()
        self.load_counts: Counter[str] = Counter()
        self.loading = ""  # key being loaded now, for status
        self.evicted: deque[str] = deque(maxlen=8)  # most recent first

    # -- queries -------------------------------------------------------------------------
    def is_resident(self, key: str) -> bool:
        return key in self._resident

    # Readers take a copy without the lock so status calls never wait behind a load.
    def snapshot(self) -> list[tuple[str, int]]:
        return [(r.key, r.bytes) for r in list(self._resident.values())]

    def used_bytes(self) -> int:
        return sum(r.bytes for r in list(self._resident.values()))

    def budget_bytes(self) -> int:
        return self._budget(self.used_bytes())

    # -- loading -------------------------------------------------------------------------
    def pin(self, keys: set[str]) -> None:
        with self._lock:
            self._pinned = set(keys)

    def ensure_resident(self, key: str, listener: LoadListener | None = None) -> Any:
        """Return the loaded model, loading it (and evicting others) if needed."""
        with self._lock:
            found = self._resident.get(key)
            if found is not None:
                found.last_used = time.monotonic()
                self._resident.move_to_end(key)
                return found.obj
            spec = self.registry.spec(key)
            expected = self._measured.get(key, spec.estimated_bytes if not self.registry.profile.tiny else 0)
            self._evict_until(expected, listener, keep=key)
            if listener:
                listener("loading", key, 0)
            self.loading = key
            try:
                obj = self._load(key)
            finally:
                self.loading = ""
            from paletta_server.engines.common import measure_bytes

            size = measure_bytes(obj)
            self._measured[key] = size
            self._resident[key] = Resident(key, obj, size, time.monotonic())
            self.load_counts[key] += 1
            # The estimate may have been low: make room after the fact, never evicting this one.
            self._evict_until(0, listener, keep=key)
            if listener:
                listener("loading", key, 1)
            return obj

    def source(self, key: str) -> ModelSource:
        """The key's source; under the tiny profile its random-weight build is written on first use."""
        from paletta_server.engines.common import import_object

        source = self.registry.source(key)
        if self.registry.profile.tiny and source.path is not None and not (source.path / ".complete").exists():
            with self._build_lock:
                if not (source.path / ".complete").exists():
                    source.path.mkdir(parents=True, exist_ok=True)
                    import_object(self.registry.spec(key).tiny_builder)(source.path)
                    (source.path / ".complete").touch()
        return source

    def _load(self, key: str) -> Any:
        from paletta_server.engines.common import import_object

        spec = self.registry.spec(key)
        source = self.source(key)
        if source.path is not None and not source.path.exists():
            raise ModelUnavailable(
                f"{key}: local folder {source.path} does not exist; " + self.registry.how_to_provide(key),
                metadata={"model": key},
            )
        loader = import_object(spec.loader)
        try:
            return loader(source, LoadContext(self.registry.profile, self.device, self.source,
                                              self.registry.config.models_dir / "nf4-cache"))
        except PalettaError:
            raise
        except (OSError, ConnectionError, ValueError, ImportError) as exc:
            raise ModelUnavailable(
                f"{key}: {type(exc).__name__}: {str(exc)[:300]}. " + self.registry.how_to_provide(key),
                metadata={"model": key},
            ) from exc

    def _evict_until(self, incoming: int, listener: LoadListener | None, keep: str) -> None:
        budget = self.budget_bytes()
        for victim in list(self._resident):
            if self.used_bytes() + incoming <= budget:
                return
            if victim == keep or victim in self._pinned:
                continue
            if listener:
                listener("evicting", victim, 0)
            self._drop(victim)
            self.evicted.appendleft(victim)
            if listener:
                listener("evicting", victim, 1)

    def _drop(self, key: str) -> int:
        from paletta_server.engines.common import free_device_memory

        resident = self._resident.pop(key)
        del resident.obj
        free_device_memory()
        return resident.bytes

    def unload(self, keys: list[str] | None = None) -> tuple[list[str], int]:
        """Unload the named (or all) resident models that the running job is not using."""
        with self._lock:
            targets = [k for k in (keys or list(self._resident)) if k in self._resident and k not in self._pinned]
            freed = sum(self._drop(k) for k in targets)
            return targets, freed
