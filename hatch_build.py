"""Hatch build hook: generate the paletta.v1 stubs from proto/ on every build or editable install.

The stubs (``*_pb2.py``, ``*_pb2_grpc.py`` and mypy-protobuf ``.pyi``) land in
``client/paletta/v1/``. They are never committed, so they can never be stale in git.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def generate_stubs(root: Path) -> list[Path]:
    """Run grpc_tools.protoc with the mypy-protobuf plugins over proto/paletta/v1."""
    import grpc_tools
    from grpc_tools import protoc

    proto_root = root / "proto"
    out = root / "client"
    target = out / "paletta" / "v1"
    for old in target.glob("*_pb2*.py*"):
        old.unlink()
    target.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(proto_root)) for p in (proto_root / "paletta" / "v1").glob("*.proto"))
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    mypy_plugin = shutil.which("protoc-gen-mypy") or str(Path(sys.executable).parent / "protoc-gen-mypy")
    mypy_grpc = shutil.which("protoc-gen-mypy_grpc") or str(Path(sys.executable).parent / "protoc-gen-mypy_grpc")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{root / 'third_party' / 'googleapis'}",
        f"-I{wkt}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={mypy_plugin}",
        f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on proto/paletta/v1")
    (target / "py.typed").touch()
    return sorted(target.glob("*_pb2*.py*"))


class CustomBuildHook(BuildHookInterface):
    """Generates the stubs before hatch collects the package files."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        generate_stubs(Path(self.root))
