"""The scripts in examples/ run against the tiny server and print what they made."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def run_example(name: str, address: str, out_dir: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / name), address, str(out_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=240)
    assert process.returncode == 0, stderr.decode()[-3000:]
    return stdout.decode().splitlines()


@pytest.mark.slow
async def test_sync_example_generates_edits_and_captions(server, tmp_path):
    lines = await run_example("sync.py", server.address, tmp_path)
    assert lines[:2] == ["knight.png 64x64", "knight-night.png 64x64"]
    assert lines[2].startswith("caption: ")
    assert (tmp_path / "knight.png").exists() and (tmp_path / "knight-night.png").exists()


@pytest.mark.slow
async def test_async_progress_example_follows_two_jobs(server, tmp_path):
    lines = await run_example("async_progress.py", server.address, tmp_path)
    assert {"fox-0.png 64x64", "fox-1.png 64x64", "owl-0.png 64x64"} <= set(lines)
    assert "fox: denoising 2/2 (variant 1)" in lines and "owl: denoising 1/2 (variant 0)" in lines
    assert lines[-1].startswith("sky coverage ")


@pytest.mark.slow
async def test_pipeline_example_saves_every_step(server, tmp_path):
    lines = await run_example("pipeline.py", server.address, tmp_path)
    assert lines[:4] == ["step 1 of 4", "step 2 of 4", "step 3 of 4", "step 4 of 4"]
    assert lines[4:] == [
        "pipeline-0-generate.png 64x64",
        "pipeline-1-segment.png 64x64",
        "pipeline-2-inpaint.png 64x64",
        "pipeline-3-upscale.png 128x128",
    ]
