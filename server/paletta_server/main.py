"""``paletta serve`` and ``paletta worker``: run until SIGINT or SIGTERM.

``python -m paletta_server.main [serve|worker] [DATA_DIR]`` runs them on the tiny profile without
the CLI (tests, the scale-out benchmark); other settings come from PALETTA_* variables.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from dataclasses import replace

from paletta_server.config import Config


async def _serve(config: Config) -> None:
    from paletta_server.server import PalettaServer

    server = PalettaServer(config)
    port = await server.start()
    role = "" if config.workers else ", front end only"
    print(f"paletta: serving on {config.host}:{port} (profile {config.profile}, data {config.data_dir}{role})",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def serve(config: Config) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(config))


def worker(config: Config) -> None:
    """One device worker on the shared PostgreSQL queue (``paletta worker``): claims jobs, runs
    them on ``config.device``, records their events, until SIGINT or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not config.database.startswith("postgresql"):
        raise SystemExit("paletta worker needs a shared PostgreSQL store: --database postgresql+psycopg://…")
    from paletta_server.app import PalettaApp

    app = PalettaApp(replace(config, workers=1))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    app.start(None)
    name = app.link.worker  # type: ignore[attr-defined]
    print(f"paletta: worker {name} ready (profile {config.profile}, device {app.device.name}, "
          f"data {config.data_dir})", flush=True)
    try:
        stop.wait()
    finally:
        app.stop()


if __name__ == "__main__":
    import sys

    from paletta_server.config import load_config

    args = sys.argv[1:]
    command = args.pop(0) if args and args[0] in ("serve", "worker") else "serve"
    loaded = load_config(args[0] if args else None, profile="tiny")
    (worker if command == "worker" else serve)(loaded)
