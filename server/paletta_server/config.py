"""The one configuration object: defaults, then ``<data-dir>/paletta.toml``, then environment, then flags."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from paletta_server.models.profiles import PROFILES

GiB = 1024**3


def default_data_dir() -> Path:
    return Path(os.environ.get("PALETTA_DATA_DIR", Path.home() / ".local" / "share" / "paletta"))


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: Path = field(default_factory=default_data_dir)
    profile: str = "fast"
    # Bearer token required on every RPC but health checks; empty disables auth.
    token: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Memory budget for resident models on CPU (on CUDA the budget is free VRAM).
    cpu_memory_budget_bytes: int = 16 * GiB
    # Bytes of VRAM kept free for activations when the budget is free VRAM.
    cuda_reserve_bytes: int = 2 * GiB
    max_queue: int = 64
    max_upload_bytes: int = 64 * 1024 * 1024
    # Largest image accepted (uploads and inline images), checked from the header before any
    # pixel is decoded: 40 MP is more than twice a 4096x4096 upscale input (16.8 MP) and any
    # camera photo, while an RGBA image this size decodes to 160 MB. Pillow's own bomb limit
    # (178,956,970 pixels) is never the one that answers.
    max_image_pixels: int = 40_000_000
    # Jobs beyond the queue head the scheduler may pick to reuse a resident model.
    affinity_lookahead: int = 4
    # How many times a job may be passed over before it must run.
    max_skips: int = 3
    preview_every: int = 2
    # Per-model source overrides: {"flux-schnell": {"path": "...", "repo": "...", "revision": "..."}}.
    models: dict[str, dict[str, str]] = field(default_factory=dict)
    # -- memory cap (issue 14): bytes the server may use on its device, models and activations together;
    # 0 = the whole device. "16GiB" plans for a 16 GB card and caps CUDA allocations to it, so a run on a
    # bigger GPU fails where that card would (flag --memory-budget, PALETTA_MEMORY_BUDGET, toml memory_budget).
    memory_budget: int = 0
    # -- scale-out (issue 13) --
    # The job store's SQLAlchemy URL: "" = SQLite in the data dir (embedded); postgresql+psycopg://user@host/db
    # shares one queue between front ends and workers on any machine (flag --database, PALETTA_DATABASE).
    database: str = ""
    # Device workers in this server process: 1 (embedded, or one GPU beside a front end) or 0 (a front end only;
    # PostgreSQL store). Each further GPU runs `paletta worker` (flag --workers, PALETTA_WORKERS).
    workers: int = 1
    # The device a worker runs on: "" picks one (CUDA if visible), "cpu", "cuda" or "cuda:N" (PALETTA_DEVICE).
    device: str = ""
    # A worker renews its lease on its running job every lease/5 s; a job whose lease ran out (its worker was
    # killed or lost the database) fails as INTERRUPTED (PALETTA_LEASE_SECONDS).
    lease_seconds: float = 10.0

    @property
    def assets_dir(self) -> Path:
        return self.data_dir / "assets"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def compile_cache_dir(self) -> Path:
        """Inductor's cache (the turbo profile's compiled code): where ``paletta serve`` points it."""
        from paletta_server.environment import process_defaults

        return Path(process_defaults(self.data_dir)["TORCHINDUCTOR_CACHE_DIR"])


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
               "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(value: str | int | float) -> int:
    """Bytes of a size: 16GiB, 16GB (10^9), 1.5GiB, 512MiB, 17179869184, "0"; case and spaces ignored."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    else:
        text = str(value).strip().lower().replace(" ", "").replace("_", "")
        digits = len(text) - len(text.lstrip("0123456789."))
        number_text, unit = text[:digits], text[digits:]
        if not number_text or unit not in _SIZE_UNITS:
            raise ValueError(f"not a size: {value!r} (use e.g. 16GiB, 16GB, 1.5GiB or a number of bytes)")
        number = float(number_text)
    if number < 0:
        raise ValueError(f"a size cannot be negative: {value!r}")
    return int(number * _SIZE_UNITS[unit])


_ENV = {
    "PALETTA_HOST": ("host", str),
    "PALETTA_PORT": ("port", int),
    "PALETTA_PROFILE": ("profile", str),
    "PALETTA_TOKEN": ("token", str),
    "PALETTA_TLS_CERT": ("tls_cert", Path),
    "PALETTA_TLS_KEY": ("tls_key", Path),
    "PALETTA_CPU_MEMORY_BUDGET": ("cpu_memory_budget_bytes", int),
    "PALETTA_MAX_QUEUE": ("max_queue", int),
    "PALETTA_MAX_UPLOAD_BYTES": ("max_upload_bytes", int),
    "PALETTA_MEMORY_BUDGET": ("memory_budget", parse_size),
    "PALETTA_MAX_IMAGE_PIXELS": ("max_image_pixels", int),
    "PALETTA_DATABASE": ("database", str),
    "PALETTA_WORKERS": ("workers", int),
    "PALETTA_DEVICE": ("device", str),
    "PALETTA_LEASE_SECONDS": ("lease_seconds", float),
}


def load_config(data_dir: Path | None = None, env: dict[str, str] | None = None, **overrides: Any) -> Config:
    """Build the config: defaults < paletta.toml in the data dir < PALETTA_* env < explicit overrides."""
    env = dict(os.environ if env is None else env)
    base = Config(data_dir=Path(data_dir) if data_dir else default_data_dir())
    values: dict[str, Any] = {}
    toml_path = base.data_dir / "paletta.toml"
    known = {f.name for f in fields(Config)}
    if toml_path.exists():
        with toml_path.open("rb") as fh:
            for key, value in tomllib.load(fh).items():
                if key in known and key != "data_dir":
                    values[key] = value
    for var, (name, kind) in _ENV.items():
        if env.get(var):
            values[name] = kind(env[var])
    values.update({k: v for k, v in overrides.items() if v is not None})
    for path_field in ("tls_cert", "tls_key"):
        if values.get(path_field) is not None:
            values[path_field] = Path(values[path_field])
    if values.get("memory_budget") is not None:  # toml and flags may give "16GiB" as well as bytes
        values["memory_budget"] = parse_size(values["memory_budget"])
    config = replace(base, **values)
    if config.profile not in PROFILES:
        raise ValueError(f"unknown profile {config.profile!r}; choose one of {', '.join(sorted(PROFILES))}")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("TLS needs both --tls-cert and --tls-key (PALETTA_TLS_CERT / PALETTA_TLS_KEY); "
                         f"only --tls-{'cert' if config.tls_cert else 'key'} was given")
    for name in ("preview_every", "max_queue", "max_upload_bytes", "max_image_pixels", "cpu_memory_budget_bytes"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    return config
