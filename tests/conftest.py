"""Shared fixtures: a real grpc.aio Paletta server on 127.0.0.1:0 with the tiny profile.

Tiny models are built once per test session into a shared models folder (the same builders
and loaders users run), and every server gets its own data dir pointing at that folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from paletta_server.config import load_config  # noqa: E402
from paletta_server.server import PalettaServer  # noqa: E402
from tests.pg import database, pg_cluster  # noqa: E402, F401  (fixtures: the job store, SQLite or PostgreSQL)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rembg: imports rembg (its first import compiles pymatting with numba)")
    # numba keeps pymatting's compiled kernels here across sessions, outside any test's HOME or
    # TMPDIR; server subprocesses inherit it as a cache the user chose.
    cache = getattr(config, "cache", None)  # absent under -p no:cacheprovider
    folder = cache.mkdir("numba") if cache is not None else Path(tempfile.gettempdir()) / "paletta-tests-numba"
    os.environ.setdefault("NUMBA_CACHE_DIR", str(folder))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Import rembg before the first test when a collected test needs it.

    The first import compiles pymatting with numba: 35-70 s on a 2-core machine, and it once ran
    past the 300 s per-test timeout in CI. pytest-timeout counts fixtures in that timeout, so the
    cost is paid here, once per cache, outside any test; afterwards the import takes 1-2 s.
    """
    if any(item.get_closest_marker("rembg") for item in session.items):
        import rembg  # noqa: F401


@dataclass
class ServerHandle:
    server: PalettaServer
    channel: grpc.aio.Channel
    address: str
    data_dir: Path

    @property
    def app(self):  # the PalettaApp: .manager, .residency, .assets, .registry, .styles
        return self.server.app


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of tiny models for the whole session (built lazily on first use)."""
    return tmp_path_factory.mktemp("tiny-models")


def link_tiny_models(data_dir: Path, shared: Path) -> None:
    models = data_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    link = models / "tiny"
    if not link.exists():
        link.symlink_to(shared, target_is_directory=True)


ServerFactory = Callable[..., Awaitable[ServerHandle]]


@pytest.fixture
async def server_factory(tmp_path: Path, tiny_models_dir: Path, database: str) -> AsyncIterator[ServerFactory]:  # noqa: F811
    """Start servers with config overrides: ``await server_factory(token="x", max_queue=2)``; their
    job store is SQLite in the data dir unless the test runs ``@both_stores`` (tests/pg.py)."""
    started: list[ServerHandle] = []

    async def start(data_dir: Path | None = None, **overrides) -> ServerHandle:
        data = data_dir or tmp_path / f"data{len(started)}"
        link_tiny_models(data, tiny_models_dir)
        overrides.setdefault("profile", "tiny")
        overrides.setdefault("database", database)
        config = load_config(data, env={}, host="127.0.0.1", port=0, **overrides)
        server = PalettaServer(config)
        port = await server.start()
        address = f"127.0.0.1:{port}"
        handle = ServerHandle(server, grpc.aio.insecure_channel(address), address, data)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        await handle.channel.close()
        await handle.server.stop(0.5)


@pytest.fixture
async def server(server_factory: ServerFactory) -> ServerHandle:
    """A tiny-profile server with default settings."""
    return await server_factory()


@pytest.fixture
def tiny_image_bytes() -> bytes:
    import io

    from PIL import Image

    img = Image.new("RGB", (96, 64))
    for x in range(96):
        for y in range(64):
            img.putpixel((x, y), (x * 2, y * 3, (x + y) % 256))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
