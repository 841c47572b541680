"""Make an image, edit it, describe it: the synchronous SDK in a few lines.

    python examples/sync.py [ADDRESS] [OUT_DIR]

ADDRESS defaults to $PALETTA_ADDRESS or 127.0.0.1:50051; images go to OUT_DIR (default ".").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import paletta


def main(address: str, out_dir: Path) -> None:
    with paletta.Client(address) as client:
        knight = client.generate("a knight in a misty forest", width=64, height=64, steps=2, seed=7).image()
        knight.save(out_dir / "knight.png")
        night = client.edit(out_dir / "knight.png", "make it night", steps=2, seed=7).image()
        night.save(out_dir / "knight-night.png")
        caption = client.caption(out_dir / "knight-night.png").result()
        print(f"knight.png {knight.size[0]}x{knight.size[1]}")
        print(f"knight-night.png {night.size[0]}x{night.size[1]}")
        print(f"caption: {caption.text}")


if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PALETTA_ADDRESS", paletta.DEFAULT_ADDRESS)
    main(address, Path(sys.argv[2]) if len(sys.argv) > 2 else Path("."))
