"""Run a multi-step pipeline as one job: generate, mask the subject, repaint it, upscale.

    python examples/pipeline.py [ADDRESS] [OUT_DIR]

ADDRESS defaults to $PALETTA_ADDRESS or 127.0.0.1:50051; images go to OUT_DIR (default ".").
Steps are a script (one ``[mode|style] text`` line per step), request messages (here the
first and last step, to set sizes), or both.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import paletta
from paletta import pipeline
from paletta.v1 import generate_pb2, upscale_pb2


def main(address: str, out_dir: Path) -> None:
    first = generate_pb2.GenerateRequest(prompt="knight in stormy mountain pass", width=64, height=64, steps=2, seed=5)
    steps = [
        pipeline.to_spec(first),
        *pipeline.parse("[auto_mask] the knight\n[inpaint] in obsidian armor with neon glow", has_image=True),
        pipeline.to_spec(upscale_pb2.UpscaleRequest(scale=2)),
    ]
    with paletta.Client(address) as client:
        job = client.pipeline(steps)
        for p in job.progress():
            if p.stage == "pipeline" and p.step < p.total:  # the last one says all are done
                print(f"step {p.step + 1} of {p.total}")
        final = job.wait()
        for output in final.outputs:
            step = json.loads(output.parameters).get("step_capability", "?")
            if output.asset.name:
                path = out_dir / f"pipeline-{output.index}-{step}.png"
                client.download_image(output.asset).save(path)
                print(f"{path.name} {output.asset.width}x{output.asset.height}")


if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PALETTA_ADDRESS", paletta.DEFAULT_ADDRESS)
    main(address, Path(sys.argv[2]) if len(sys.argv) > 2 else Path("."))
