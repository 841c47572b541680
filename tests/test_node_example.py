"""examples/node/client.mjs, a grpc-js client, against the tiny server: the contracts work from Node.

Needs `node` (20+) and `npm ci --prefix examples/node` (CI runs both); skips, saying which is
missing, otherwise.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "node"


def _skip_reason() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed (the Node example needs Node 20+)"
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return "examples/node has no node_modules: run `npm ci --prefix examples/node`"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
async def test_node_client_generates_downloads_and_decodes_bad_request(server, tmp_path):
    process = await asyncio.create_subprocess_exec(
        "node", str(EXAMPLE / "client.mjs"), server.address, str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, stderr.decode()
    lines = stdout.decode().splitlines()

    assert "event progress denoising 2/2" in lines
    (output,) = [line.split() for line in lines if line.startswith("event output ")]
    assert output[2].startswith("assets/") and output[4] == "11"
    assert any(line.startswith("event finished jobs/") and line.endswith("JOB_STATE_SUCCEEDED") for line in lines)

    image = Image.open(tmp_path / "lighthouse-0.png")
    assert image.size == (64, 48)
    assert f"downloaded {output[2]} {(tmp_path / 'lighthouse-0.png').stat().st_size} bytes" in stdout.decode()

    violations = [line.removeprefix("violation ") for line in lines if line.startswith("violation ")]
    assert [v.split(":")[0] for v in violations] == ["prompt", "width", "steps"]
    assert "width: must be a multiple of 16, got 17" in violations
    assert any(line.startswith("bad request INVALID_ARGUMENT ") for line in lines)
