"""Follow two jobs at once with typed progress: the asyncio SDK.

    python examples/async_progress.py [ADDRESS] [OUT_DIR]

ADDRESS defaults to $PALETTA_ADDRESS or 127.0.0.1:50051; images go to OUT_DIR (default ".").
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import paletta


async def follow(name: str, job: paletta.AsyncJobHandle[Any], out_dir: Path) -> None:
    async for p in job.progress():
        if p.stage == "queued":
            print(f"{name}: queued at {p.queue_position}")
        elif p.preview is None:
            print(f"{name}: {p.stage} {p.step}/{p.total} (variant {p.variant})")
    index = 0
    async for image in job.images():  # the outputs, downloaded
        image.save(out_dir / f"{name}-{index}.png")
        print(f"{name}-{index}.png {image.size[0]}x{image.size[1]}")
        index += 1


async def main(address: str, out_dir: Path) -> None:
    async with paletta.AsyncClient(address) as client:
        fox = client.generate("a fox in the snow", width=64, height=64, steps=2, seed=1, variants=2)
        owl = client.generate("an owl at dusk", width=64, height=64, steps=2, seed=2)
        await asyncio.gather(follow("fox", fox, out_dir), follow("owl", owl, out_dir))
        # The one-expression form: a capability call is awaitable without an extra await.
        sky = await client.segment(out_dir / "owl-0.png", "the sky").result()
        print(f"sky coverage {sky.coverage:.2f}, mask {sky.mask}")


if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PALETTA_ADDRESS", paletta.DEFAULT_ADDRESS)
    asyncio.run(main(address, Path(sys.argv[2]) if len(sys.argv) > 2 else Path(".")))
