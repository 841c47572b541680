"""Capabilities: one module per family, each exporting CAPABILITY or CAPABILITIES (see base.py)."""

from __future__ import annotations

import importlib
import pkgutil

from paletta_server.capabilities.base import Capability

# Shared helpers, not capabilities.
_HELPERS = {"base", "common", "diffusion_io"}


def discover() -> dict[str, Capability]:
    """Every capability defined in this package, by name."""
    found: dict[str, Capability] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _HELPERS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for cap in getattr(module, "CAPABILITIES", None) or [getattr(module, "CAPABILITY", None)]:
            if isinstance(cap, Capability):
                found[cap.name] = cap
    return found
