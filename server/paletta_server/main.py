"""``paletta serve``: run the server until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

from paletta_server.config import Config
from paletta_server.server import PalettaServer


async def _serve(config: Config) -> None:
    server = PalettaServer(config)
    port = await server.start()
    print(f"paletta: serving on {config.host}:{port} (profile {config.profile}, data {config.data_dir})", flush=True)
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


if __name__ == "__main__":
    import sys

    from paletta_server.config import load_config

    serve(load_config(sys.argv[1] if len(sys.argv) > 1 else None, profile="tiny"))
