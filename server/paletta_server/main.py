"""``paletta serve`` and ``paletta worker``: run until SIGINT or SIGTERM.

``python -m paletta_server.main [serve|worker] [DATA_DIR]`` runs them on the tiny profile without
the CLI (tests, the scale-out benchmark); other settings come from PALETTA_* variables.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import replace

from paletta_server.config import Config
from paletta_server.environment import prepare_process, quiet_warnings
from paletta_server.server import BindError, PalettaServer

log = logging.getLogger("paletta_server")
EXIT_CANNOT_LISTEN = 2
# Job streams run as long as their jobs, so a shutdown does not wait for them to end: it bounds
# the wait. Jobs are persisted; clients re-attach with WatchJob after a restart.
SHUTDOWN_WAIT = 2.0


async def _serve(config: Config) -> None:
    server = PalettaServer(config)
    port = await server.start()
    role = "" if config.workers else ", front end only"
    print(f"paletta: serving on {config.host}:{port} (profile {config.profile}, data {config.data_dir}{role})",
          flush=True)
    stop = asyncio.Event()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():  # a second Ctrl-C: the user does not want to wait for the grace period
            log.warning("%s again: exiting now", sig.name)
            os._exit(128 + sig.value)
        received.append(sig)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await stop.wait()
    finally:
        start = time.monotonic()
        log.info("%s: shutting down (no new calls; running calls and the running job get %g s)",
                 received[0].name if received else "stop", SHUTDOWN_WAIT)
        await server.stop(grace=SHUTDOWN_WAIT, worker_wait=SHUTDOWN_WAIT)
        log.info("stopped in %.1f s", time.monotonic() - start)


def serve(config: Config) -> None:
    # Before anything imports a model library: they read these settings at import.
    prepare_process(config.data_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_warnings()
    try:
        asyncio.run(_serve(config))
    except BindError as exc:
        print(f"paletta: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CANNOT_LISTEN) from None
    # Everything is persisted and the worker has stopped. Tearing down the interpreter after
    # torch, numba and onnxruntime were loaded takes seconds of native finalizers that protect
    # nothing, so skip it (a job still running on the worker is recorded INTERRUPTED at the next
    # start either way).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def worker(config: Config) -> None:
    """One device worker on the shared PostgreSQL queue (``paletta worker``): claims jobs, runs
    them on ``config.device``, records their events, until SIGINT or SIGTERM."""
    prepare_process(config.data_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_warnings()
    if not config.database.startswith("postgresql"):  # a usage error: exit 2 like the others
        raise ValueError("paletta worker needs a shared PostgreSQL store: --database postgresql+psycopg://…")
    from paletta_server.app import PalettaApp

    app = PalettaApp(replace(config, workers=1))
    stop = threading.Event()
    received: list[str] = []

    def on_signal(sig: int, _frame: object) -> None:
        received.append(signal.Signals(sig).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    app.start(None)
    name = app.link.worker  # type: ignore[attr-defined]
    print(f"paletta: worker {name} ready (profile {config.profile}, device {app.device.name}, "
          f"data {config.data_dir})", flush=True)
    try:
        stop.wait()
    finally:
        log.info("%s: worker %s shutting down (the running job stops at its next step)",
                 received[0] if received else "stop", name)
        app.stop()
        log.info("worker %s stopped", name)


if __name__ == "__main__":
    from paletta_server.config import load_config

    args = sys.argv[1:]
    command = args.pop(0) if args and args[0] in ("serve", "worker") else "serve"
    loaded = load_config(args[0] if args else None, profile="tiny")
    (worker if command == "worker" else serve)(loaded)
