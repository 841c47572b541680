"""Stubs for every Paletta service on one channel (sync or ``grpc.aio``)."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import paletta.v1


def make_stubs(channel: Any) -> dict[str, Any]:
    """{"GenerateService": GenerateServiceStub(channel), …} for every generated service module."""
    stubs: dict[str, Any] = {}
    for info in pkgutil.iter_modules(paletta.v1.__path__):
        if not info.name.endswith("_pb2_grpc"):
            continue
        module = importlib.import_module(f"paletta.v1.{info.name}")
        for attr in dir(module):
            if attr.endswith("ServiceStub"):
                stubs[attr.removesuffix("Stub")] = getattr(module, attr)(channel)
    return stubs
