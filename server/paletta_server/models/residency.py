"""Residency manager: loads models lazily, measures them, evicts to fit a memory budget, offloads
or refuses when that is not enough.

Only the device worker loads models; ``unload`` may come from any thread, so a lock guards the
table, and models the running job uses are pinned against eviction and unloading.

Every load follows ``models.memory.plan`` twice: before loading with the best footprint known (the
measured one after a first load, else the estimate table for the device's quantization; tiny builds
have none) and again with the measured footprint after loading. On a CPU device the first plan only
evicts: offload and refusal wait for the measurement, as a local folder may hold other sizes than
the table's. A plan evicts (other families first, then least recently used), offloads (diffusers
model CPU offload, only when the budget needs it; the job sees a progress event with stage
"offloading"), or refuses: RESOURCE_EXHAUSTED with reason MEMORY_BUDGET and metadata model /
needed_bytes / budget_bytes. Refusals happen on CUDA and whenever a memory cap is set; without a
cap the CPU budget is a soft target (evict, never refuse).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paletta_server.errors import ModelUnavailable, PalettaError, ResourceExhausted
from paletta_server.models import memory
from paletta_server.models.registry import ModelRegistry
from paletta_server.models.types import LoadContext, ModelSource

# stage, model key, done (0 = started, 1 = finished)
LoadListener = Callable[[str, str, int], None]


@dataclass
class Resident:
    key: str
    obj: Any
    bytes: int  # on the device: all weights, or the offload peak when offloaded
    last_used: float
    offloaded: bool = False


class ResidencyManager:
    def __init__(self, registry: ModelRegistry, device: Any, budget: Callable[[int], int], *, cap: int = 0,
                 capacity: int = 0):
        """``budget(used_by_us)`` returns the bytes models and a job's activations may use in total (see
        server wiring); ``cap`` is the configured memory cap (0: none); ``capacity`` the budget with
        nothing loaded, which the inference edge and the two-family rule are derived from."""
        self.registry = registry
        self.device = device
        self._budget = budget
        self.cap = cap
        # Refuse what cannot fit (else: load anyway, the CPU budget being a soft target).
        self.strict = getattr(device, "name", "cpu") == "cuda" or cap > 0
        self._resident: OrderedDict[str, Resident] = OrderedDict()
        self._pinned: set[str] = set()
        self._measured: dict[str, memory.Footprint] = {}
        self._lock = threading.RLock()
        self._build_lock = threading.Lock()
        self.load_counts: Counter[str] = Counter()
        self.loading = ""  # key being loaded now, for status
        self.evicted: deque[str] = deque(maxlen=8)  # most recent first
        profile = registry.profile
        if capacity:
            families = [self.footprint(k) for k in memory.EDGE_FAMILIES if k in registry.specs]
            self.policy = memory.derive_policy(capacity, families, profile.max_inference_edge)
        else:
            self.policy = memory.Policy(profile.max_inference_edge, True)

    # -- queries -------------------------------------------------------------------------
    def is_resident(self, key: str) -> bool:
        return key in self._resident

    # Readers take a copy without the lock so status calls never wait behind a load.
    def snapshot(self) -> list[tuple[str, int]]:
        return [(r.key, r.bytes) for r in list(self._resident.values())]

    def offloaded(self) -> list[str]:
        return [r.key for r in list(self._resident.values()) if r.offloaded]

    def used_bytes(self) -> int:
        return sum(r.bytes for r in list(self._resident.values()))

    def budget_bytes(self) -> int:
        return self._budget(self.used_bytes())

    def footprint(self, key: str) -> memory.Footprint:
        """Measured after a first load; else the estimate for the device's quantization (none for tiny builds)."""
        if key in self._measured:
            return self._measured[key]
        if self.registry.profile.tiny:
            return memory.Footprint(0, family=key in memory.FAMILY_KEYS)
        spec = self.registry.spec(key)
        return memory.estimate(key, getattr(self.device, "quantization", "fp32"), spec.estimated_bytes)

    def plan(self, key: str, footprint: memory.Footprint | None = None) -> memory.Plan:
        """What loading ``key`` would do now (models/memory.py)."""
        resident = [(r.key, r.bytes, r.key in memory.FAMILY_KEYS) for r in list(self._resident.values())]
        return memory.plan(self.budget_bytes(), resident, set(self._pinned), key,
                           footprint or self.footprint(key), self.policy.inference_edge,
                           self.policy.keep_two_families)

    # -- loading -------------------------------------------------------------------------
    def pin(self, keys: set[str]) -> None:
        with self._lock:
            self._pinned = set(keys)

    def ensure_resident(self, key: str, listener: LoadListener | None = None) -> Any:
        """Return the loaded model, loading it (and evicting or offloading as planned) if needed."""
        with self._lock:
            found = self._resident.get(key)
            if found is not None:
                found.last_used = time.monotonic()
                self._resident.move_to_end(key)
                return found.obj
            before = self.footprint(key)
            plan = self.plan(key, before)
            if getattr(self.device, "name", "cpu") != "cuda" and key not in self._measured:
                # In host memory an estimate only makes room: offload and refusal wait for the measurement
                # (local folders may hold other sizes than the released weights the table describes).
                plan = memory.Plan(() if plan.refuse else plan.evict)
            if plan.refuse:
                if self.strict and before.weights:
                    raise self._refusal(key, plan)
                plan = memory.Plan(self._all_evictable(key))  # soft budget: make what room there is
            self._evict(plan.evict, listener)
            if plan.offload and listener:
                listener("offloading", key, 0)
            if listener:
                listener("loading", key, 0)
            self.loading = key
            try:
                obj = self._load(key, offload=plan.offload)
            finally:
                self.loading = ""
            measured = memory.measure_footprint(obj, before.working, key in memory.FAMILY_KEYS)
            self._measured[key] = measured
            offloaded = plan.offload
            # The estimate may have been wrong: plan again with what was measured (as loaded).
            as_loaded = measured
            if offloaded:
                as_loaded = memory.Footprint(measured.offload_peak or measured.weights, 0, measured.working,
                                             measured.family)
            after = self.plan(key, as_loaded)
            if after.refuse and self.strict:
                del obj
                self._free()
                raise self._refusal(key, after)
            if after.refuse:
                after = memory.Plan(self._all_evictable(key), offloaded)
            self._evict(after.evict, listener)
            if after.offload and not offloaded:
                if listener:
                    listener("offloading", key, 0)
                from paletta_server.engines.flux import offload_model_cpu

                offload_model_cpu(obj, self.device)
                offloaded = True
            if offloaded and listener:
                listener("offloading", key, 1)
            size = measured.offload_peak if offloaded and measured.offload_peak else measured.weights
            self._resident[key] = Resident(key, obj, size, time.monotonic(), offloaded)
            self.load_counts[key] += 1
            if listener:
                listener("loading", key, 1)
            return obj

    def _refusal(self, key: str, plan: memory.Plan) -> ResourceExhausted:
        budget = self.budget_bytes()
        cap = f" (memory cap {memory.format_bytes(self.cap)})" if self.cap else ""
        error = ResourceExhausted(
            f"{plan.refuse}{cap}: {key} cannot run within the memory budget even after evicting every other "
            f"model ({memory.format_bytes(plan.needed)} needed, {memory.format_bytes(budget)} budget)",
            reason="MEMORY_BUDGET")
        error.metadata = {"model": key, "needed_bytes": str(plan.needed), "budget_bytes": str(budget),
                          "kept_bytes": str(plan.kept), "memory_cap_bytes": str(self.cap)}
        return error

    def _all_evictable(self, keep: str) -> tuple[str, ...]:
        return tuple(k for k in self._resident if k != keep and k not in self._pinned)

    def _evict(self, victims: tuple[str, ...] | list[str], listener: LoadListener | None) -> None:
        for victim in victims:
            if victim not in self._resident or victim in self._pinned:
                continue
            if listener:
                listener("evicting", victim, 0)
            self._drop(victim)
            self.evicted.appendleft(victim)
            if listener:
                listener("evicting", victim, 1)

    @staticmethod
    def _free() -> None:
        from paletta_server.engines.common import free_device_memory

        free_device_memory()

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

    def _load(self, key: str, offload: bool = False) -> Any:
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
            config = self.registry.config
            return loader(source, LoadContext(self.registry.profile, self.device, self.source,
                                              config.models_dir / "nf4-cache", config.compile_cache_dir,
                                              offload=offload))
        except PalettaError:
            raise
        except (OSError, ConnectionError, ValueError, ImportError) as exc:
            raise ModelUnavailable(
                f"{key}: {type(exc).__name__}: {str(exc)[:300]}. " + self.registry.how_to_provide(key),
                metadata={"model": key},
            ) from exc

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
