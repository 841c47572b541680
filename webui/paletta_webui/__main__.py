"""``python -m paletta_webui --address 127.0.0.1:50051 --port 8080``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

try:
    from nicegui import ui
except ImportError as err:  # an SDK-only install: say what to install, not a traceback
    raise SystemExit(f"the page is not installed ({err.name} is missing): pip install 'paletta[webui]'") from None

import paletta
from paletta_webui.page import default_client, make_root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="paletta_webui", description="Paletta web page (a client of the server).")
    parser.add_argument("--address", default=os.environ.get("PALETTA_ADDRESS", paletta.DEFAULT_ADDRESS))
    parser.add_argument("--token", default=os.environ.get("PALETTA_TOKEN", ""))
    parser.add_argument("--tls-root-cert", default=os.environ.get("PALETTA_TLS_ROOT_CERT", ""))
    parser.add_argument("--host", default="127.0.0.1", help="where the page listens")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--cache-dir", type=Path, default=None, help="where output images are cached")
    args = parser.parse_args(argv)

    def client() -> paletta.AsyncClient:
        return default_client(args.address, args.token or None, args.tls_root_cert or None)

    ui.run(make_root(client, args.cache_dir), host=args.host, port=args.port, title="Paletta", reload=False,
           show=False)


if __name__ in {"__main__", "__mp_main__"}:
    main()
