"""The ``paletta`` command, in-process with Click's CliRunner against one tiny-profile server.

The server runs for the whole module on its own event loop in a thread, so models stay
resident between tests; what each command asked for is read back from the server (GetJob's
``spec``), not from the CLI. Two tests start real processes: ``paletta --token X serve`` and
``paletta`` without arguments on the terminal-less path.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from PIL import Image

from paletta import Client, Progress, cli
from paletta import _cli_output as out
from paletta.v1 import (
    control_pb2,
    image_pb2,
    inpaint_pb2,
    job_options_pb2,
    job_pb2,
    job_spec_pb2,
    segment_pb2,
)
from tests.conftest import link_tiny_models


@dataclass
class Live:
    address: str
    data_dir: Path


@pytest.fixture(scope="module")
def live(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A tiny-profile server on its own loop in a thread, for the whole module."""
    from paletta_server.config import load_config
    from paletta_server.server import PalettaServer

    data = tmp_path_factory.mktemp("cli-data")
    link_tiny_models(data, tiny_models_dir)
    config = load_config(data, env={}, host="127.0.0.1", port=0, profile="tiny")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="cli-test-server", daemon=True)
    thread.start()

    async def start() -> tuple[PalettaServer, int]:
        server = PalettaServer(config)
        return server, await server.start()

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(120)
    try:
        yield Live(f"127.0.0.1:{port}", data)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0.5), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def sdk(live: Live) -> Iterator[Client]:
    with Client(live.address) as client:
        yield client


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "photo.png"
    image = Image.new("RGB", (64, 48))
    for x in range(64):
        for y in range(48):
            image.putpixel((x, y), (x * 4, y * 5, (x * y) % 256))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def mask(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "mask.png"
    image = Image.new("L", (64, 48), 0)
    image.paste(255, (16, 12, 48, 36))
    image.save(path)
    return path


def run(live: Live, *args: str, env: dict[str, str] | None = None, **kwargs: object) -> Result:
    """``paletta --address LIVE ARGS`` in-process."""
    return CliRunner().invoke(cli.app, ["--address", live.address, *args], env=env, catch_exceptions=False, **kwargs)


def events(result: Result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def finished(result: Result) -> dict:
    assert result.exit_code == 0, result.stderr
    last = events(result)[-1]
    assert last["event"] == "finished" and last["state"] == "succeeded", last
    return last


def spec_of(sdk: Client, result: Result) -> job_pb2.Job:
    return sdk.get_job(finished(result)["job"])


# -- every capability reaches the server with every field ---------------------------------------


def test_generate_sends_every_field_and_streams_json_events(live, sdk, photo, tmp_path):
    target = tmp_path / "knight.png"
    result = run(
        live, "--json", "generate", "a knight", "-o", str(target),
        "--width", "64", "--height", "48", "--steps", "2", "--seed", "7", "--variants", "2", "--guidance", "1.5",
        "--style", "tarot:0.8", "--style", "anime", "--image-prompt", str(photo), "--image-prompt-weight", "0.5",
        "--priority", "low", "--request-id", "cli-gen-1", "--cancel-on-disconnect",
    )
    job = spec_of(sdk, result)
    g = job.spec.generate
    assert (g.prompt, g.width, g.height, g.steps, g.seed, g.variants, g.guidance) == ("a knight", 64, 48, 2, 7, 2, 1.5)
    assert [(s.name, round(s.weight, 2), s.HasField("weight")) for s in g.styles] == [
        ("tarot", 0.8, True), ("anime", 1.0, True)]  # anime: sent unset, its default in the spec
    assert g.image_prompt.image.asset.startswith("assets/") and round(g.image_prompt.weight, 2) == 0.5
    assert job.priority == job_options_pb2.PRIORITY_LOW and job.request_id == "cli-gen-1"

    lines = events(result)
    progress = [e for e in lines if e["event"] == "progress" and e["stage"] == "denoising"]
    assert [(e["step"], e["total"], e["unit"], e["variant"]) for e in progress] == [
        (1, 2, "steps", 0), (2, 2, "steps", 0), (1, 2, "steps", 1), (2, 2, "steps", 1)]
    assert all(e["job"] == job.name for e in lines)
    outputs = [e for e in lines if e["event"] == "output"]
    second = str(tmp_path / "knight-1.png")
    assert [(e["index"], e["seed"], e["file"]) for e in outputs] == [(0, 7, str(target)), (1, 8, second)]
    assert lines[-1] == {"event": "finished", "job": job.name, "state": "succeeded", "capability": "generate",
                         "files": [str(target), second]}
    assert json.loads(Image.open(second).text["parameters"])["seed"] == 8

    # The same request id re-attaches to the same job instead of making another.
    again = run(live, "--json", "generate", "a knight", "-o", str(tmp_path / "again.png"), "--width", "64",
                "--height", "48", "--steps", "2", "--seed", "7", "--variants", "2", "--request-id", "cli-gen-1")
    assert finished(again)["job"] == job.name


def test_edit_and_qwen_edit_send_their_fields(live, sdk, photo, tmp_path):
    edit = run(live, "--json", "edit", str(photo), "make it night", "-o", str(tmp_path / "e.png"), "--steps", "2",
               "--seed", "3", "--guidance", "4", "--style", "koda:1.2", "--upscaler", "realesrgan")
    e = spec_of(sdk, edit).spec.edit
    assert (e.prompt, e.steps, e.seed, e.guidance) == ("make it night", 2, 3, 4.0)
    assert e.upscaler == image_pb2.UPSCALER_REALESRGAN
    assert [(s.name, round(s.weight, 2)) for s in e.styles] == [("koda", 1.2)]
    assert Image.open(tmp_path / "e.png").size == (64, 48)

    qwen = run(live, "--json", "qwen-edit", str(photo), "add a hat", "--negative-prompt", "blurry", "-o",
               str(tmp_path / "q.png"), "--steps", "2", "--guidance", "5", "--variants", "1")
    q = spec_of(sdk, qwen).spec.qwen_edit
    assert (q.prompt, q.negative_prompt, q.steps, q.guidance, q.variants) == ("add a hat", "blurry", 2, 5.0, 1)


def test_inpaint_with_a_mask_file_and_with_auto_mask(live, sdk, photo, mask, tmp_path):
    by_file = run(live, "--json", "inpaint", str(photo), "a red coat", "--mask", str(mask), "--feather", "3",
                  "-o", str(tmp_path / "i.png"), "--steps", "2", "--guidance", "20")
    i = spec_of(sdk, by_file).spec.inpaint
    assert (i.prompt, i.feather, i.steps, i.guidance) == ("a red coat", 3, 2, 20.0)
    assert i.mask.asset.startswith("assets/") and i.image.asset != i.mask.asset

    auto = run(live, "--json", "inpaint", str(photo), "a red coat", "--auto-mask", "the square",
               "--auto-mask-threshold", "0.0", "--auto-mask-dilate", "2", "-o", str(tmp_path / "a.png"), "--steps", "2")
    job = spec_of(sdk, auto)
    masks = [j for j in sdk.list_jobs(capability="segment") if j.spec.segment.text == "the square"]
    assert len(masks) == 1 and masks[0].spec.segment.dilate == 2 and masks[0].spec.segment.threshold == 0.0
    assert job.spec.inpaint.mask.asset == masks[0].outputs[0].asset.name

    # neither: a cut-out's transparent pixels are the mask (remove-bg, then a new backdrop)
    cut = run(live, "--json", "remove-bg", str(photo), "-o", str(tmp_path / "cut.png"))
    backdrop = run(live, "--json", "inpaint", str(tmp_path / "cut.png"), "a beach", "-o", str(tmp_path / "b.png"),
                   "--steps", "1")
    assert cut.exit_code == 0 and backdrop.exit_code == 0, backdrop.stderr
    assert not spec_of(sdk, backdrop).spec.inpaint.HasField("mask")
    both = run(live, "inpaint", str(photo), "x", "--mask", str(mask), "--auto-mask", "y", "-o", str(tmp_path / "n.png"))
    assert both.exit_code == 2 and "not both" in both.stderr


def test_outpaint_sends_each_side(live, sdk, photo, tmp_path):
    result = run(live, "--json", "outpaint", str(photo), "more room", "--left", "16", "--right", "32", "--top", "0",
                 "--bottom", "16", "--feather", "4", "-o", str(tmp_path / "o.png"), "--steps", "2")
    o = spec_of(sdk, result).spec.outpaint
    assert (o.prompt, o.left, o.right, o.top, o.bottom, o.feather) == ("more room", 16, 32, 0, 16, 4)
    assert Image.open(tmp_path / "o.png").size == (64 + 48, 48 + 16)


def test_control_sends_type_preprocess_scale_and_size(live, sdk, photo, tmp_path):
    result = run(live, "--json", "control", str(photo), "a watercolor city", "--type", "canny", "--preprocess",
                 "canny", "--control-scale", "0.5", "--width", "64", "--height", "32", "-o", str(tmp_path / "c.png"),
                 "--steps", "2")
    c = spec_of(sdk, result).spec.control
    assert (c.control_type, c.preprocess, round(c.control_scale, 2), c.width, c.height) == (
        control_pb2.CONTROL_TYPE_CANNY, control_pb2.PREPROCESS_CANNY, 0.5, 64, 32)
    assert Image.open(tmp_path / "c.png").size == (64, 32)


def test_identity_sends_every_field(live, sdk, photo, tmp_path):
    result = run(live, "--json", "identity", str(photo), "a knight", "-o", str(tmp_path / "id.png"),
                 "--id-strength", "0.8", "--start-step", "1", "--face-index", "0", "--true-cfg", "2",
                 "--negative-prompt", "blurry", "--width", "32", "--height", "32", "--steps", "2", "--seed", "5")
    last = events(result)[-1]  # the tiny face detector may or may not find a face: either way the request arrived
    assert result.exit_code in (0, 1) and last["event"] in ("finished", "error"), result.stderr
    i = sdk.get_job(last["job"]).spec.identity
    assert (i.prompt, round(i.id_strength, 2), i.start_step, i.HasField("face_index"), i.true_cfg) == (
        "a knight", 0.8, 1, True, 2.0)
    assert (i.negative_prompt, i.width, i.height, i.steps, i.seed) == ("blurry", 32, 32, 2, 5)


def test_upscale_labels_tiles_on_plain_stderr(live, sdk, photo, tmp_path):
    result = run(live, "upscale", str(photo), "-o", str(tmp_path / "big.png"), "--scale", "2", "--tile", "32",
                 "--overlap", "4", "--upscaler", "realesrgan")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "big.png")]
    assert Image.open(tmp_path / "big.png").size == (128, 96)
    # 64×48 in 32-pixel tiles: 2×2 = 4 tiles, counted as tiles.
    assert "paletta: tiling 4/4 tiles" in result.stderr.splitlines()
    job = sdk.list_jobs(capability="upscale", limit=1)[0]
    u = job.spec.upscale
    assert (u.upscaler, u.scale, u.tile, u.overlap) == (image_pb2.UPSCALER_REALESRGAN, 2.0, 32, 4)


def test_remove_bg_writes_cutout_and_mask(live, sdk, photo, tmp_path):
    result = run(live, "--json", "remove-bg", str(photo), "--mask", "-o", str(tmp_path / "cut.png"))
    assert spec_of(sdk, result).spec.remove_background.return_mask
    assert Image.open(tmp_path / "cut.png").mode == "RGBA"
    assert Image.open(tmp_path / "cut-1.png").mode == "L"


def test_vision_commands_print_typed_results(live, sdk, photo, tmp_path):
    seg = run(live, "--json", "segment", str(photo), "the sky", "--threshold", "0.3", "--dilate", "2",
              "--feather", "1", "-o", str(tmp_path / "m.png"))
    s = spec_of(sdk, seg).spec.segment
    assert (s.text, round(s.threshold, 2), s.dilate, s.feather) == ("the sky", 0.3, 2, 1)
    result = [e for e in events(seg) if e["event"] == "output"][0]["result"]
    assert result["type"] == "segmentation" and 0 <= result["coverage"] <= 1 and (tmp_path / "m.png").exists()

    det = run(live, "--json", "detect", str(photo), "--threshold", "0.0")
    assert spec_of(sdk, det).spec.detect.threshold == 0.0
    detections = [e for e in events(det) if e["event"] == "output"][0]["result"]
    assert detections["type"] == "detections" and (detections["width"], detections["height"]) == (64, 48)

    grd = run(live, "--json", "ground", str(photo), "a dragon", "a torch", "--threshold", "0.0")
    assert list(spec_of(sdk, grd).spec.ground.queries) == ["a dragon", "a torch"]

    cap = run(live, "--json", "caption", str(photo), "--depth", "deep", "--max-tokens", "5")
    c = spec_of(sdk, cap).spec.caption
    assert (c.depth, c.max_tokens) == (2, 5)
    text = [e for e in events(cap) if e["event"] == "output"][0]["result"]
    assert text["type"] == "caption" and isinstance(text["text"], str)

    ana = run(live, "analyze", str(photo), "--threshold", "0.0", "--no-progress")
    assert ana.exit_code == 0 and ana.stderr.strip().startswith("jobs/")
    a = sdk.list_jobs(capability="analyze", limit=1)[0].spec.analyze
    assert a.threshold == 0.0 and a.HasField("threshold")

    exp = run(live, "--json", "expand", "a cozy cabin", "--seed", "4", "--max-tokens", "8")
    e = spec_of(sdk, exp).spec.expand
    assert (e.prompt, e.seed, e.max_tokens) == ("a cozy cabin", 4, 8)
    expansion = [x for x in events(exp) if x["event"] == "output"][0]["result"]
    assert expansion["type"] == "expansion" and expansion["original"] == "a cozy cabin"


def test_pipeline_from_stdin_labels_progress_by_step(live, sdk, tmp_path):
    script = "[generate] a knight\n[auto_mask] the knight\n[inpaint] obsidian armor\n"
    result = run(live, "pipeline", "-", "-o", str(tmp_path / "chain.png"), "--style", "tarot:0.6", input=script)
    assert result.exit_code == 0, result.stderr
    job = sdk.list_jobs(capability="pipeline", limit=1)[0]
    assert [s.WhichOneof("spec") for s in job.spec.pipeline.steps] == ["generate", "segment", "inpaint"]
    styles = job.spec.pipeline.steps[0].generate.styles  # the default style: on generate, not on inpaint
    assert [(x.name, round(x.weight, 2)) for x in styles] == [("tarot", 0.6)]
    assert not job.spec.pipeline.steps[2].inpaint.styles
    assert job.spec.pipeline.steps[1].segment.text == "the knight"
    lines = result.stderr.splitlines()
    assert any(line.startswith("paletta: step 1/3 generate · denoising ") for line in lines)
    assert any(line.startswith("paletta: step 3/3 inpaint · denoising ") for line in lines)
    assert lines[-1] == "paletta: 3/3 steps done" and not any("step 4/3" in line for line in lines)
    # The generate image, the mask (with its coverage) and the inpainted image, numbered in order.
    written = [line for line in result.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert written == [str(tmp_path / n) for n in ("chain.png", "chain-1.png", "chain-2.png")]
    assert "coverage" in result.stdout


def test_pipeline_steps_as_json_reach_every_capability_and_field(live, sdk, tmp_path):
    steps = [{"generate": {"prompt": "a harbour", "width": 32, "height": 32, "steps": 1, "seed": "5"}},
             {"outpaint": {"prompt": "sea", "right": 16, "steps": 1}},
             {"control": {"prompt": "a tower", "controlType": "CONTROL_TYPE_CANNY", "preprocess": "PREPROCESS_CANNY",
                          "steps": 1}},
             {"detect": {"threshold": 0.0}}]
    result = run(live, "pipeline", "-", "-o", str(tmp_path / "j.png"), input=json.dumps(steps))
    assert result.exit_code == 0, result.stderr
    job = sdk.list_jobs(capability="pipeline", limit=1)[0]
    assert [s.WhichOneof("spec") for s in job.spec.pipeline.steps] == ["generate", "outpaint", "control", "detect"]
    assert (job.spec.pipeline.steps[0].generate.seed, job.spec.pipeline.steps[1].outpaint.right) == (5, 16)
    assert [json.loads(o.parameters)["step_capability"] for o in job.outputs][:3] == ["generate", "outpaint", "control"]
    assert job.outputs[-1].WhichOneof("result") == "detections"
    bad = run(live, "pipeline", "-", "-o", str(tmp_path / "b.png"), input='[{"outpaint": {"left": "wide"}}]')
    assert bad.exit_code == 2 and "step 1" in bad.stderr


# -- people and programs --------------------------------------------------------------------------


def test_plain_progress_lines_name_variant_and_units(live, tmp_path):
    result = run(live, "generate", "a knight", "-o", str(tmp_path / "k.png"), "--width", "32", "--height", "32",
                 "--steps", "2", "--variants", "2")
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("jobs/")
    assert "paletta: variant 1/2 · denoising 2/2 steps" in lines
    assert "paletta: variant 2/2 · denoising 1/2 steps" in lines
    assert result.stdout.split() == [str(tmp_path / "k.png"), str(tmp_path / "k-1.png")]


def test_progress_is_drawn_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    context = out.JobContext(variants=2)
    screen = Terminal()
    with out.ProgressView(context, stream=screen) as view:
        assert view.live
        for step in (1, 2):
            view.update(Progress("denoising", step, 2, variant=1))
    assert view.lines == []  # drawn by rich, not printed line by line
    assert "variant 2/2 · denoising" in screen.getvalue()

    plain = io.StringIO()
    with out.ProgressView(context, stream=plain) as view:
        view.update(Progress("loading", 0, 0, model="flux-schnell"))
        view.update(Progress("tiling", 3, 4))
        view.update(Progress("tiling", 3, 4))  # repeated: not printed twice
    assert not view.live
    assert plain.getvalue().splitlines() == [
        "paletta: variant 1/2 · loading flux-schnell", "paletta: variant 1/2 · tiling 3/4 tiles"]


def test_listings_for_people_and_as_json(live, sdk, tmp_path):
    made = run(live, "--json", "generate", "a lake", "-o", str(tmp_path / "l.png"), "--width", "32", "--height",
               "32", "--steps", "1", "--variants", "2")
    name = finished(made)["job"]

    listed = run(live, "jobs", "list", "--capability", "generate", "--state", "succeeded", "--json")
    assert listed.exit_code == 0
    jobs = json.loads(listed.stdout)["jobs"]
    assert name in [j["name"] for j in jobs] and {j["state"] for j in jobs} == {"JOB_STATE_SUCCEEDED"}
    table = run(live, "jobs", "list", "--limit", "1")
    assert table.stdout.splitlines()[1].split()[:3] == [name, "succeeded", "generate"]

    got = run(live, "jobs", "get", name, "--json")
    assert json.loads(got.stdout)["spec"]["generate"]["prompt"] == "a lake"
    assert 'request:    generate {"prompt": "a lake"' in run(live, "jobs", "get", name).stdout

    approved = run(live, "--json", "jobs", "approve", name, "1")
    assert json.loads(approved.stdout) == {"job": name, "index": 1, "approved": True, "approved_outputs": [1]}
    assert [o.approved for o in sdk.get_job(name).outputs] == [False, True]

    watched = run(live, "jobs", "watch", name, "--after-seq", "1", "--json")
    kinds = [e["event"] for e in events(watched)]
    assert kinds[-1] == "finished" and kinds.count("output") == 2 and int(events(watched)[0]["seq"]) == 2
    assert all(e["event"] in e for e in events(watched))  # {"event": "output", "output": {...}, "seq": …}
    lines = run(live, "jobs", "watch", name).stdout.splitlines()  # for people: labelled like `generate`'s
    assert lines[0] == "   1 queued position=0" and lines[-1].endswith(" finished succeeded"), lines
    assert [line.split(" progress ")[1] for line in lines if " progress variant 2/2 · denoising" in line] == [
        "variant 2/2 · denoising 1/1 steps"], lines

    status = run(live, "status", "--json")
    assert json.loads(status.stdout)["profile"] == "tiny"
    assert "profile:      tiny" in run(live, "status").stdout
    models = json.loads(run(live, "--json", "models").stdout)["models"]
    assert "flux-schnell" in [m["key"] for m in models]
    styles = run(live, "styles")
    assert styles.exit_code == 0 and "tarot" in styles.stdout
    assert {"tarot", "anime"} <= {s["name"] for s in json.loads(run(live, "styles", "--json").stdout)["styles"]}


# -- exit codes -----------------------------------------------------------------------------------


def test_request_the_server_refuses_exits_2_with_field_violations(live, sdk, tmp_path):
    before = len(sdk.list_jobs(limit=None))
    result = run(live, "generate", "x", "-o", str(tmp_path / "o.png"), "--width", "17")
    assert result.exit_code == 2
    assert "width:" in result.stderr and "16" in result.stderr
    assert not (tmp_path / "o.png").exists()

    as_json = run(live, "--json", "pipeline", "-", "-o", str(tmp_path / "p.png"), input="[generate] a\n[inpaint] b\n")
    assert as_json.exit_code == 2
    error = events(as_json)[-1]
    assert error["event"] == "error" and error["code"] == "INVALID_ARGUMENT" and error["exit_code"] == 2
    assert [v["field"] for v in error["field_violations"]] == ["steps[1].inpaint.mask"]
    assert len(sdk.list_jobs(limit=None)) == before


def test_bad_usage_exits_2_before_anything_is_sent(live, sdk, photo, tmp_path):
    before = len(sdk.list_jobs(limit=None))
    assert run(live, "generate", "x", "-o", str(tmp_path / "o.png"), "--steps", "0").exit_code == 2
    # no mask on an opaque image: refused by the server at submission (no job), exit 2
    assert run(live, "inpaint", str(photo), "x", "-o", str(tmp_path / "o.png")).exit_code == 2
    assert run(live, "outpaint", str(photo), "-o", str(tmp_path / "o.png")).exit_code == 2  # no side
    assert run(live, "control", str(photo), "x", "-o", str(tmp_path / "o.png")).exit_code == 2  # no --type
    assert run(live, "edit", str(tmp_path / "absent.png"), "x", "-o", str(tmp_path / "o.png")).exit_code == 2
    assert run(live, "generate", "x", "--style", "tarot:heavy", "-o", str(tmp_path / "o.png")).exit_code == 2
    # -o is checked before submitting: a directory, a file as a folder, an unknown suffix.
    (tmp_path / "file").write_text("x")
    for target, why in [(tmp_path, "is a directory"), (tmp_path / "file" / "o.png", "is not a directory"),
                        (tmp_path / "o.gif", "unknown image suffix")]:
        result = run(live, "generate", "x", "-o", str(target))
        assert result.exit_code == 2 and why in result.stderr
    contradiction = run(live, "caption", str(photo), "--deep", "--depth", "fast")
    assert contradiction.exit_code == 2 and "--deep contradicts --depth fast" in contradiction.stderr
    no_ca = run(live, "--tls-ca", str(tmp_path / "absent.pem"), "caption", str(photo))
    assert no_ca.exit_code == 2 and "absent.pem: no such file" in no_ca.stderr
    assert len(sdk.list_jobs(limit=None)) == before


def test_failed_job_exits_1_and_names_the_bad_field(live, sdk, tmp_path):
    request = job_spec_pb2.RunPipelineRequest(steps=[
        job_spec_pb2.JobSpec(generate={"prompt": "a", "width": 32, "height": 32, "steps": 1}),
        job_spec_pb2.JobSpec(segment=segment_pb2.SegmentRequest(text="a dragon", threshold=1.0)),
        job_spec_pb2.JobSpec(inpaint=inpaint_pb2.InpaintRequest(prompt="fire", steps=1)),
    ])
    job = sdk.pipeline(list(request.steps))
    with pytest.raises(Exception):  # noqa: B017 - the SDK's JobFailed; the CLI's handling is under test
        job.wait()
    result = run(live, "jobs", "watch", job.name)
    assert result.exit_code == 1
    assert "steps[2].inpaint.mask" in result.stderr
    assert result.stdout.splitlines()[-1].split()[1:3] == ["finished", "failed:"]
    assert any(line.endswith(" progress step 2/3 segment") for line in result.stdout.splitlines()), result.stdout


def test_unreachable_server_gives_one_line_hint(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(cli.app, ["status", "--server", f"127.0.0.1:{port}"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"paletta: cannot reach the Paletta server at 127.0.0.1:{port}: start it with `paletta serve`"]


def test_ctrl_c_cancels_the_job_and_exits_130(live, sdk, tmp_path, monkeypatch):
    def interrupt(self: out.ProgressView, p: Progress) -> None:
        if p.stage == "denoising":
            raise KeyboardInterrupt

    monkeypatch.setattr(out.ProgressView, "update", interrupt)
    result = run(live, "generate", "slow", "-o", str(tmp_path / "s.png"), "--width", "32", "--height", "32",
                 "--steps", "100", "--variants", "8")
    assert result.exit_code == 130
    name = result.stderr.splitlines()[0]
    assert f"paletta: cancelled {name}" in result.stderr
    deadline = time.monotonic() + 30
    while sdk.get_job(name).state != job_pb2.JOB_STATE_CANCELLED and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sdk.get_job(name).state == job_pb2.JOB_STATE_CANCELLED


def test_main_returns_exit_codes_without_raising(live, capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("paletta ")
    assert cli.main(["generate"]) == 2  # missing PROMPT
    assert "Missing argument 'PROMPT'" in capsys.readouterr().err
    assert cli.main(["--address", live.address, "status"]) == 0


def test_every_command_has_help_with_an_example():
    runner = CliRunner()
    commands = [[name] for name in cli.app.commands if name != "jobs"]
    commands += [["jobs", name] for name in ("list", "get", "watch", "cancel", "approve")]
    assert {c[0] for c in commands} >= {
        "generate", "edit", "inpaint", "outpaint", "qwen-edit", "control", "upscale", "remove-bg", "segment",
        "detect", "ground", "caption", "analyze", "expand", "pipeline", "identity", "status", "models", "styles",
        "serve", "worker"}
    for command in commands:
        result = runner.invoke(cli.app, [*command, "--help"])
        assert result.exit_code == 0 and re.search(r"Example:\n    .*paletta ", result.stdout), command
    generate = runner.invoke(cli.app, ["generate", "-h"]).stdout
    assert "1<=x<=100" in generate and "[default: (4)" in generate and "--token" in generate
    # upscale's unset upscaler is Real-ESRGAN (upscale.proto); the diffusion modes restore with LANCZOS
    upscale, edit = (" ".join(runner.invoke(cli.app, [c, "-h"]).stdout.split()) for c in ("upscale", "edit"))
    assert "[default: (realesrgan)]" in upscale and "[default: (lanczos)]" not in upscale
    assert "[default: (lanczos)]" in edit


# -- global options before or after the command (issue 8) -----------------------------------------


def test_global_options_work_before_or_after_and_from_env(live, tmp_path, monkeypatch):
    seen: list[tuple[str, str | None]] = []
    from paletta import _cli_base

    def spy(settings: _cli_base.Settings) -> Client:
        seen.append((settings.server_address, settings.bearer_token))
        return Client(settings.server_address)

    monkeypatch.setattr(_cli_base, "make_client", spy)
    runner = CliRunner()
    assert runner.invoke(cli.app, ["--token", "a", "status", "--address", live.address]).exit_code == 0
    assert runner.invoke(cli.app, ["--address", live.address, "status", "--token", "b"]).exit_code == 0
    env = {"PALETTA_ADDRESS": live.address, "PALETTA_TOKEN": "c"}
    assert runner.invoke(cli.app, ["jobs", "list"], env=env).exit_code == 0
    between = runner.invoke(cli.app, ["jobs", "--address", live.address, "--token", "d", "--json", "list"])
    assert between.exit_code == 0 and "jobs" in json.loads(between.stdout)  # between a group and its command
    assert seen == [(live.address, "a"), (live.address, "b"), (live.address, "c"), (live.address, "d")]


@pytest.mark.parametrize("argv", [["--token", "t0k", "serve"], ["serve", "--token", "t0k"]])
def test_serve_takes_token_before_or_after_the_command(argv, tmp_path, monkeypatch):
    import paletta_server.main

    configs = []
    monkeypatch.setattr(paletta_server.main, "serve", configs.append)
    monkeypatch.delenv("PALETTA_TOKEN", raising=False)
    flags = ["--host", "0.0.0.0", "--port", "6000", "--profile", "tiny", "--data-dir", str(tmp_path),
             "--tls-cert", "c.pem", "--tls-key", "k.pem", "--memory-budget", "1GiB"]
    result = CliRunner().invoke(cli.app, [*argv, *flags])
    assert result.exit_code == 0, result.output
    (config,) = configs
    assert (config.host, config.port, config.profile, config.token, config.data_dir) == (
        "0.0.0.0", 6000, "tiny", "t0k", tmp_path)
    assert (config.tls_cert, config.tls_key, config.memory_budget) == (Path("c.pem"), Path("k.pem"), 1024**3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_token_before_serve_starts_an_authenticated_server(tmp_path):
    """Issue 8: `paletta --token X serve` used to start a server without authentication."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PALETTA_")}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(str(root / p) for p in ("server", "client", "webui", "."))
    command = [sys.executable, "-m", "paletta.cli", "--token", "s3cret", "serve", "--profile", "tiny",
               "--port", str(port), "--data-dir", str(tmp_path)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        lines: list[str] = []
        # "paletta: serving on …" is printed once it listens and handles SIGINT (log lines come before).
        while not any(x.startswith("paletta: serving on") for x in lines) and len(lines) < 50:
            lines.append(process.stdout.readline())
        assert f"paletta: serving on 127.0.0.1:{port}" in lines[-1], lines
        address = f"127.0.0.1:{port}"
        runner = CliRunner()
        refused = runner.invoke(cli.app, ["--address", address, "status"], env={"PALETTA_TOKEN": ""})
        assert refused.exit_code == 1 and "UNAUTHENTICATED" in refused.stderr
        allowed = runner.invoke(cli.app, ["--address", address, "--token", "s3cret", "status"])
        assert allowed.exit_code == 0 and "profile:      tiny" in allowed.stdout
    finally:
        process.send_signal(2)
        assert process.wait(30) == 0


def test_output_path_numbering():
    assert out.output_path(Path("out.png"), 0) == Path("out.png")
    assert out.output_path(Path("dir/out.png"), 2) == Path("dir/out-2.png")

