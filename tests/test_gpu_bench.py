"""The GPU benchmark (tests/bench/gpu.py) runs its whole code path at tiny size on the CPU and
writes every figure the GPU run reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMED = ("grpc_median_s", "direct_median_s", "ratio", "s_per_step_grpc", "s_per_step_direct")
BREAKDOWN = ("started_to_first_step", "first_to_last_step", "last_step_to_output", "output_to_finished", "total")


@pytest.mark.slow
def test_tiny_run_writes_every_figure(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PALETTA_")}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench.gpu", "--size", "tiny", "--steps", "2", "--runs", "2", "--res", "128",
         "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["errors"] == [] and data["skipped"] == []
    assert data["meta"]["size"] == "tiny" and data["build"]["total_s"] > 0
    profiles = data["profiles"]
    for label in ("fast", "quality", "fast_restart", "turbo", "turbo_restart"):
        assert profiles[label]["server_start_s"] > 0
        assert profiles[label]["first_image_s"] >= profiles[label]["server_start_s"]
    # turbo compiles on its first image; the restart on the same data dir compiles from the cache
    assert profiles["turbo"]["compile_first_image"]["fxgraph_cache_miss"] > 0
    restart = profiles["turbo_restart"]["compile"]
    assert restart["fxgraph_cache_miss"] == 0 and restart["fxgraph_cache_hit"] > 0
    measured = [(label, kind) for label in ("fast", "quality", "turbo") for kind in ("generate", "edit")]
    measured += [("fast_restart", "fill"), ("quality_fill", "fill")]
    for label, kind in measured:
        figures = profiles[label][kind]
        assert figures["setup"]["steps"] == 2 and figures["setup"]["size"] == [128, 128]
        assert len(figures["grpc_s"]) == len(figures["direct_s"]) == len(figures["direct_with_previews_s"]) == 2
        for name in TIMED:
            assert figures[name] > 0, (label, kind, name)
        for name in BREAKDOWN:
            assert figures["breakdown_ms"][name] >= 0, (label, kind, name)
        assert figures["breakdown_ms"]["steps"] == 2
        assert figures["progress_latency_ms"]["n"] == 4 and figures["progress_latency_ms"]["max"] > 0
        assert figures["resident_bytes"][figures["setup"]["key"]] > 0
        assert figures["peak_rss_bytes"] > 0
        if kind != "fill":
            png = figures["png"]
            assert png["size"] == [128, 128] and png["stored_bytes"] > 0
            for name in ("pillow_level1_ms", "sha256_ms", "write_fsync_ms", "encode_png_ms"):
                assert png[name] > 0, (label, kind, name)
    summary = (out / "summary.md").read_text()
    assert "| first image after start (s) |" in summary
    # The memory stage: a 16 GiB cap (on the CPU it drives the planner only), one job per capability.
    memory = data["memory"]
    assert memory["status"]["memory_cap_bytes"] == 16 * 1024**3 and memory["status"]["inference_edge"] > 0
    assert set(memory["jobs"]) == {"generate", "edit", "inpaint", "control", "identity", "qwen_edit"}
    for kind, job in memory["jobs"].items():
        assert job["passed"] and job["peak_rss_bytes"] > 0 and job["s_per_step"] > 0, (kind, job)
        assert job["size"] == [128, 128] and job["resident_bytes"]
    assert "| qwen_edit | PASS |" in summary
    assert not (tmp_path / "work").exists()  # the weights and data dirs are removed


@pytest.mark.slow
def test_only_the_named_stages_run_and_a_refusal_is_recorded(tmp_path):
    """--only quality memory runs those two stages and no other; a job over the cap is a FAIL with
    MEMORY_BUDGET, not an error."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PALETTA_")}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench.gpu", "--size", "tiny", "--steps", "3", "--res", "64", "--runs", "2",
         "--only", "quality", "memory",
         "--memory-budget", "1MiB", "--skip", "edit", "inpaint", "control", "generate", "identity", "--out", str(out),
         "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert set(data["profiles"]) == {"quality"} and data["errors"] == []
    for kind in ("generate", "edit"):  # 3 steps: one preview due, at step 2; on the CPU it is never dropped
        figures = data["profiles"]["quality"][kind]
        assert figures["ratio"] > 0 and figures["previews"] == {"due": 1, "direct": [1, 1], "grpc": [1, 1]}
        assert {side: len(pauses["ms"]) for side, pauses in figures["gc"].items()} == {"grpc": 3, "direct": 3}
    jobs = data["memory"]["jobs"]
    assert set(jobs) == {"qwen_edit"}
    qwen = jobs["qwen_edit"]
    assert not qwen["passed"] and qwen["reason"] == "MEMORY_BUDGET" and qwen["metadata"]["model"] == "qwen-image-edit"
    assert "| qwen_edit | FAIL |" in (out / "summary.md").read_text()


def test_gc_pauses_are_timed_by_generation_while_entered():
    import gc

    from tests.bench.gpu import GcPauses

    pauses = GcPauses()
    gc.disable()  # only the collections below
    try:
        gc.collect(0)  # not entered: not counted
        with pauses:
            gc.collect(1)
            gc.collect()
        gc.collect()
    finally:
        gc.enable()
    assert pauses.count == [0, 1, 1] and pauses.ms[1] > 0 and pauses.ms[2] > 0 and pauses.ms[0] == 0
    assert pauses.figures()["collections"] == [0, 1, 1]
