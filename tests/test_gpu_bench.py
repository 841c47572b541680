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
    # Every full-size component the GPU run builds was constructed (on the meta device) from its real
    # config with these library versions, at the released models' sizes.
    billions = {name: round(entry["params"] / 1e9, 2) for name, entry in data["preflight"].items()}
    assert billions == {"transformer": 11.90, "text_encoder_2": 4.76, "text_encoder": 0.12, "vae": 0.08,
                        "controlnet": 3.30, "qwen_transformer": 20.43, "qwen_vae": 0.13, "qwen_text_encoder": 8.29}
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
    MEMORY_BUDGET, not an error; identity, its face packages missing (as on the lent GPU's image), is
    skipped saying why, and its models are not built."""
    out = tmp_path / "out"
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['facexlib'] = None  # not installed\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PALETTA_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hide), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench.gpu", "--size", "tiny", "--steps", "3", "--res", "64", "--runs", "2",
         "--only", "quality", "memory",
         "--memory-budget", "1MiB", "--skip", "edit", "inpaint", "control", "generate", "--out", str(out),
         "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert set(data["profiles"]) == {"quality"} and data["errors"] == []
    for kind in ("generate", "edit"):  # 3 steps: one preview due, at step 2; on the CPU it is never dropped
        figures = data["profiles"]["quality"][kind]
        assert figures["ratio"] > 0 and figures["previews"] == {"due": 1, "direct": [1, 1], "grpc": [1, 1]}
        assert figures["ratio_with_previews"] > 0
        assert {side: len(pauses["ms"]) for side, pauses in figures["gc"].items()} == {"grpc": 3, "direct": 3}
    assert data["skipped"] == [{"stage": "memory.identity", "reason": "needs facexlib (not installed)"}]
    assert data["build"]["memory_folders"] == ["qwen-image-edit"]
    jobs = data["memory"]["jobs"]
    assert set(jobs) == {"qwen_edit"}
    qwen = jobs["qwen_edit"]
    assert not qwen["passed"] and qwen["reason"] == "MEMORY_BUDGET" and qwen["metadata"]["model"] == "qwen-image-edit"
    assert "| qwen_edit | FAIL |" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_an_interrupted_run_keeps_its_figures_writes_the_summary_and_removes_its_weights(tmp_path):
    """gpu_device.sh's deadline interrupts the benchmark with SIGINT: it exits 3 with results.json and
    summary.md holding what was measured, and the work folder (tens of GB in a tmpfs on a GPU) gone."""
    import signal
    import time

    out, work = tmp_path / "out", tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PALETTA_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.gpu", "--size", "tiny", "--steps", "2", "--res", "64", "--runs", "2",
         "--only", "quality", "turbo", "--out", str(out), "--work", str(work)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if "edit" in json.loads((out / "results.json").read_text())["profiles"].get("quality", {}):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        assert proc.poll() is None, "finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)  # quality is done; turbo (compiling) is next or under way
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 3, output[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["profiles"]["quality"]["generate"]["ratio"] > 0
    assert "| generate: gRPC / direct (s) |" in (out / "summary.md").read_text()
    assert not work.exists()


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
