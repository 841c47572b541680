"""The page, headless (NiceGUI's simulated User), against a real tiny-profile server.

Each mode test fills the form, runs it and checks the request that reached the server
(``Job.spec``, the stored request, read back through the SDK) and what the page shows.
"""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nicegui import ui
from nicegui.testing import User
from nicegui.testing import general as nicegui_testing_general
from nicegui.testing.user_interaction import UserInteraction
from nicegui.testing.user_simulation import user_simulation
from PIL import Image

import paletta
from paletta.v1 import control_pb2, image_pb2, job_pb2
from paletta_webui import modes
from paletta_webui.logic import asset_url, data_url, spec_summary
from paletta_webui.mask_editor import MaskEditor
from paletta_webui.page import default_client, make_root
from tests.conftest import link_tiny_models
from tests.helpers import face_photo


def png(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def mask_png(size: tuple[int, int] = (64, 48)) -> bytes:
    mask = Image.new("L", size, 0)
    mask.paste(255, (8, 8, 40, 32))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
async def page(server, tmp_path, monkeypatch) -> AsyncIterator[tuple[User, paletta.AsyncClient]]:
    monkeypatch.chdir(tmp_path)  # NiceGUI keeps its storage under the working directory
    # NiceGUI's reset runs gc.collect() on entry and exit: seconds each once torch models are in the process.
    monkeypatch.setattr(nicegui_testing_general.gc, "collect", lambda *a: 0)
    sdk = paletta.AsyncClient(server.address)
    root = make_root(lambda: default_client(server.address), cache_dir=tmp_path / "cache")
    async with user_simulation(root=root) as user:
        await user.open("/")
        await user.should_see(marker="style-tarot", retries=100)  # the page has loaded from the server
        yield user, sdk
    await sdk.close()


def one(user: User, marker: str) -> Any:
    elements = user.find(marker=marker).elements
    assert len(elements) == 1, f"{len(elements)} elements marked {marker}"
    return next(iter(elements))


def fill(user: User, **values: Any) -> None:
    """Set form fields by name (``prompt`` or a mode field)."""
    with user:
        for name, value in values.items():
            one(user, name if name in ("prompt", "mode", "ip-weight") else f"field-{name}").value = value


async def give_image(user: User, data: bytes, slot: str = "image") -> str:
    """An image into a slot as a drop or paste brings it: POST /inputs, then the tab's event."""
    reply = await user.http_client.post("/inputs", content=data)
    assert reply.status_code == 200, reply.text
    asset = reply.json()["asset"]
    UserInteraction(user, {user.client.layout}, None).trigger("paletta_image", {"slot": slot, "asset": asset})
    return asset


async def job_names(sdk: paletta.AsyncClient) -> set[str]:
    return {j.name for j in await sdk.list_jobs(limit=50)}


async def finished_job(user: User, sdk: paletta.AsyncClient, before: set[str], timeout: float = 60) -> job_pb2.Job:
    """The job started since ``before``, once it has ended and the page shows it."""
    for _ in range(int(timeout / 0.05)):
        new = [j for j in await sdk.list_jobs(limit=5) if j.name not in before]
        if new and new[0].state not in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING):
            await user.should_see(marker=f"job-{new[0].name}", retries=100)
            return new[0]
        await asyncio.sleep(0.05)
    raise AssertionError("no job finished")


async def run(user: User, sdk: paletta.AsyncClient) -> job_pb2.Job:
    before = await job_names(sdk)
    user.find(marker="run").click()
    job = await finished_job(user, sdk, before)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error.message
    await user.should_see(marker=f"output-{job.name}-0", retries=100)
    return job


def shown_sources(user: User) -> set[str]:
    return {str(e.source) for e in user.find(kind=ui.image).elements}


# -- one test per mode -------------------------------------------------------------------------------


async def test_generate_sends_size_seed_variants_and_style(page):
    user, sdk = page
    fill(user, prompt="a knight", width=64, height=48, steps=2, seed=5, variants=2)
    with user:
        one(user, "style-tarot").value = True
        one(user, "style-weight-tarot").value = 0.8
    job = await run(user, sdk)
    spec = job.spec.generate
    assert (spec.prompt, spec.width, spec.height, spec.steps, spec.seed, spec.variants) == ("a knight", 64, 48, 2, 5, 2)
    assert [(s.name, round(s.weight, 2)) for s in spec.styles] == [("tarot", 0.8)]
    await user.should_see("#0 · seed 5")
    await user.should_see("#1 · seed 6")
    url = asset_url(job.outputs[1].asset.name)
    assert url in shown_sources(user)
    served = await user.http_client.get(url)  # by URL through the page's route, not inline
    assert served.headers["content-type"] == "image/png"
    assert served.content == await sdk.download(job.outputs[1].asset.name)


async def test_edit_sends_the_input_image_and_image_prompt(page):
    user, sdk = page
    fill(user, mode="edit")
    image = await give_image(user, png())
    reference = await give_image(user, png((32, 32), (0, 200, 0)), slot="image_prompt")
    fill(user, prompt="make it night", steps=2, seed=1, **{"ip-weight": 0.5})
    job = await run(user, sdk)
    spec = job.spec.edit
    assert (spec.image.asset, spec.prompt, spec.steps, round(spec.guidance, 2)) == (image, "make it night", 2, 2.5)
    assert (spec.image_prompt.image.asset, round(spec.image_prompt.weight, 2)) == (reference, 0.5)
    assert job.outputs[0].asset.width == 64


async def test_inpaint_sends_the_painted_mask_as_png(page):
    user, sdk = page
    fill(user, mode="inpaint")
    image = await give_image(user, png())
    fill(user, prompt="a hat", steps=2, feather=3)
    editor = user.find(kind=MaskEditor)
    editor.trigger("mask", data_url(mask_png()))  # what the canvas emits after a stroke
    await user.should_see("Mask painted", retries=20)
    job = await run(user, sdk)
    spec = job.spec.inpaint
    assert (spec.image.asset, spec.prompt, spec.feather) == (image, "a hat", 3)
    sent = Image.open(io.BytesIO(await sdk.download(spec.mask.asset))).convert("L")
    assert sent.size == (64, 48) and sent.getbbox() == (8, 8, 40, 32)


async def test_inpaint_without_a_mask_repaints_a_cut_out_or_says_why_not_at_the_mask(page):
    user, sdk = page
    fill(user, mode="inpaint")
    await give_image(user, png())  # opaque: the server asks for a mask, shown at the mask slot
    await user.should_see("No mask painted: a cut-out's transparent pixels are repainted")
    fill(user, prompt="a beach", steps=1)
    user.find(marker="run").click()
    await user.should_see("unless the image has transparent pixels", retries=100)
    cutout = Image.open(io.BytesIO(png())).convert("RGBA")
    alpha = Image.new("L", cutout.size, 0)
    alpha.paste(255, (16, 8, 48, 40))  # a subject; transparent around it
    cutout.putalpha(alpha)
    buffer = io.BytesIO()
    cutout.save(buffer, format="PNG")
    image = await give_image(user, buffer.getvalue())
    job = await run(user, sdk)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error.message
    assert job.spec.inpaint.image.asset == image and not job.spec.inpaint.HasField("mask")


async def test_inpaint_auto_mask_by_text_lands_as_the_mask(page):
    user, sdk = page
    fill(user, mode="inpaint")
    await give_image(user, png())
    user.find("Auto-mask: what to select").type("the red")
    user.find(marker="auto-mask").click()
    await user.should_see("Auto-mask “the red”", retries=200)
    segment = (await sdk.list_jobs(limit=1, capability="segment"))[0]
    assert segment.spec.segment.text == "the red"
    fill(user, prompt="a cat", steps=2)
    job = await run(user, sdk)
    assert job.spec.inpaint.mask.asset == segment.outputs[0].asset.name


async def test_outpaint_sends_the_sides(page):
    user, sdk = page
    fill(user, mode="outpaint")
    await give_image(user, png())
    fill(user, left=16, top=32, steps=2)
    job = await run(user, sdk)
    spec = job.spec.outpaint
    assert (spec.left, spec.right, spec.top, spec.bottom, spec.prompt) == (16, 0, 32, 0, "")
    assert (job.outputs[0].asset.width, job.outputs[0].asset.height) == (80, 80)


async def test_qwen_edit_sends_the_negative_prompt(page):
    user, sdk = page
    fill(user, mode="qwen_edit")
    await give_image(user, png())
    fill(user, prompt="add a hat", negative_prompt="blurry", steps=2)
    job = await run(user, sdk)
    spec = job.spec.qwen_edit
    assert (spec.prompt, spec.negative_prompt, spec.steps, round(spec.guidance, 1)) == ("add a hat", "blurry", 2, 4.0)


async def test_control_sends_type_scale_and_server_preprocessing(page):
    user, sdk = page
    fill(user, mode="control")
    control = await give_image(user, png(), slot="control_image")
    fill(user, prompt="a city", control_type="canny", preprocess=True, control_scale=0.5, steps=2)
    job = await run(user, sdk)
    spec = job.spec.control
    assert (spec.control_image.asset, spec.control_type, spec.preprocess) == (
        control, control_pb2.CONTROL_TYPE_CANNY, control_pb2.PREPROCESS_CANNY,
    )
    assert round(spec.control_scale, 2) == 0.5


async def test_identity_sends_the_face_and_shows_the_face_box_and_crop(page):
    user, sdk = page
    fill(user, mode="identity")
    await user.should_see("Face photo")  # the input image slot is the face
    await user.should_not_see(marker="slot-image_prompt")
    assert one(user, "field-guidance").value == 4.0 and one(user, "field-id_strength").value == 1.0
    buf = io.BytesIO()
    face_photo(1).save(buf, format="PNG")  # two faces the tiny detector finds: 128² and 64²
    face = await give_image(user, buf.getvalue())
    fill(user, prompt="portrait of a knight", width=64, height=64, steps=2, seed=5, id_strength=0.8, start_step=1,
         face_index=1)
    with user:
        one(user, "style-tarot").value = True
    job = await run(user, sdk)
    spec = job.spec.identity
    assert (spec.face.asset, spec.prompt, spec.width, spec.height, spec.steps, spec.seed) == (
        face, "portrait of a knight", 64, 64, 2, 5)
    assert (round(spec.id_strength, 2), spec.start_step, spec.face_index) == (0.8, 1, 1)
    assert (round(spec.guidance, 1), round(spec.true_cfg, 1), spec.HasField("negative_prompt")) == (4.0, 1.0, False)
    assert [s.name for s in spec.styles] == ["tarot"]
    result = job.outputs[0].face_identity
    box = result.box
    assert (result.face_index, result.faces_found) == (1, 2)
    await user.should_see(f"face 2 of 2 · score {result.score:.2f} at ({box.x_min:.0f}, {box.y_min:.0f}) "
                          f"{box.x_max - box.x_min:.0f}×{box.y_max - box.y_min:.0f}")
    await user.should_see(marker=f"face-crop-{job.name}-0")
    assert asset_url(result.face_crop) in shown_sources(user)
    # as a pipeline step the face goes with the step (never chained)
    user.find("Add the form as a step").click()
    await user.should_see("1. identity: portrait of a knight")


async def test_upscale_sends_upscaler_and_scale(page):
    user, sdk = page
    fill(user, mode="upscale")
    await give_image(user, png())
    fill(user, upscaler="lanczos", scale=2)
    job = await run(user, sdk)
    assert (job.spec.upscale.upscaler, job.spec.upscale.scale) == (image_pb2.UPSCALER_LANCZOS, 2.0)
    assert job.outputs[0].asset.width == 128


async def test_remove_background_with_the_mask(page):
    user, sdk = page
    fill(user, mode="remove_background")
    await give_image(user, png())
    fill(user, return_mask=True)
    job = await run(user, sdk)
    assert job.spec.remove_background.return_mask is True
    assert len(job.outputs) == 2
    await user.should_see(marker=f"output-{job.name}-1", retries=50)


async def test_segment_shows_the_coverage_and_use_as_mask(page):
    user, sdk = page
    fill(user, mode="segment")
    await give_image(user, png())
    fill(user, text="the sky", threshold=0.3, dilate=4)
    job = await run(user, sdk)
    spec = job.spec.segment
    assert (spec.text, round(spec.threshold, 2), spec.dilate) == ("the sky", 0.3, 4)
    await user.should_see(f"coverage {job.outputs[0].segmentation.coverage:.0%}")
    user.find("Use as mask").click()
    await user.should_see(f"Mask: {job.outputs[0].asset.name}")


async def test_detect_sends_the_threshold_and_lists_detections(page):
    user, sdk = page
    fill(user, mode="detect")
    await give_image(user, png())
    fill(user, threshold=0.5)
    job = await run(user, sdk)
    assert round(job.spec.detect.threshold, 2) == 0.5
    found = job.outputs[0].detections.detections
    await user.should_see(f"{found[0].label} {found[0].score:.2f}" if found else "nothing found")


async def test_ground_sends_the_queries(page):
    user, sdk = page
    fill(user, mode="ground")
    await give_image(user, png())
    fill(user, queries="a cat, the dragon ")
    job = await run(user, sdk)
    assert list(job.spec.ground.queries) == ["a cat", "the dragon"]
    assert round(job.spec.ground.threshold, 2) == 0.1


async def test_caption_shows_the_text(page):
    user, sdk = page
    fill(user, mode="caption")
    await give_image(user, png())
    fill(user, max_tokens=12)
    job = await run(user, sdk)
    assert job.spec.caption.max_tokens == 12
    await user.should_see(job.outputs[0].caption.text)


async def test_analyze_chips_insert_into_the_prompt(page):
    user, sdk = page
    fill(user, mode="edit")
    await give_image(user, png())
    fill(user, prompt="replace")
    user.find("Analyze").click()
    await user.should_see(marker="chip", retries=200)
    analyze = (await sdk.list_jobs(limit=1, capability="analyze"))[0]
    caption = analyze.outputs[0].caption
    user.find(marker="chip", content=caption.text).click()
    assert one(user, "prompt").value == f"replace, {caption.text}"
    # the same capability as its own mode
    fill(user, mode="analyze", threshold=0.6)
    job = await run(user, sdk)
    assert round(job.spec.analyze.threshold, 2) == 0.6


async def test_expand_mode_and_enhance_with_undo(page):
    user, sdk = page
    fill(user, prompt="a cabin")
    user.find("Enhance").click()
    await user.should_see("Undo enhance", retries=200)
    expanded = (await sdk.list_jobs(limit=1, capability="expand"))[0].outputs[0].expansion.expanded
    assert one(user, "prompt").value == expanded
    user.find("Undo enhance").click()
    assert one(user, "prompt").value == "a cabin"
    fill(user, mode="expand", seed=3, max_tokens=20)
    job = await run(user, sdk)
    assert (job.spec.expand.prompt, job.spec.expand.seed, job.spec.expand.max_tokens) == ("a cabin", 3, 20)
    await user.should_see(job.outputs[0].expansion.expanded)


# -- the form --------------------------------------------------------------------------------------


async def test_each_mode_shows_only_its_fields(page):
    user, _ = page
    await user.should_see(marker="field-width")
    fill(user, mode="upscale")
    await user.should_not_see(marker="field-width")
    await user.should_not_see(marker="prompt")
    await user.should_see(marker="field-tile")
    await user.should_not_see("Brush")
    fill(user, mode="inpaint")
    await user.should_see("Brush")
    await user.should_see(marker="field-feather")
    await user.should_not_see(marker="field-tile")
    await user.should_not_see(marker="slot-control_image")
    assert one(user, "field-guidance").value == 30.0  # FLUX Fill's default, from the proto


async def test_styles_are_disabled_with_the_reason_in_modes_that_refuse_them(page):
    user, _ = page
    await user.should_see(marker="style-tarot")
    fill(user, mode="inpaint")
    await user.should_see("Inpaint refuses styles: they apply to Generate, Edit (Kontext) and Identity (PuLID) only.")
    assert not one(user, "style-tarot").enabled
    await user.should_see("trigger: “in the style of TOK a trtcrd tarot style”")


async def test_bad_field_shows_the_servers_violation_next_to_it(page):
    user, sdk = page
    fill(user, prompt="a knight", width=17, height=64, steps=1)
    user.find(marker="run").click()
    for _ in range(100):
        if one(user, "field-width").error:
            break
        await asyncio.sleep(0.05)
    assert one(user, "field-width").error == "must be a multiple of 16, got 17"
    assert not one(user, "form-error").text


async def test_missing_input_image_is_said_at_the_slot(page):
    user, _ = page
    fill(user, mode="edit", prompt="make it night")
    user.find(marker="run").click()
    await user.should_see("Add an input image first (pick, drop or paste one)")


# -- pipeline, queue, history, GPU --------------------------------------------------------------------


async def test_pipeline_box_runs_form_and_script_steps_and_labels_outputs(page):
    user, sdk = page
    fill(user, prompt="a knight", width=64, height=64, steps=1, seed=2)
    user.find("Add the form as a step").click()
    user.find(marker="pipeline-script").type("[auto_mask] the knight\n[upscale]")
    user.find("Add lines").click()
    fill(user, mode="outpaint", prompt="", right=16, steps=1)
    user.find("Add the form as a step").click()
    await user.should_see("4. outpaint: +0/16/0/0 px (left/right/top/bottom)")
    before = await job_names(sdk)
    user.find(marker="run-pipeline").click()
    job = await finished_job(user, sdk, before)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error.message
    assert [s.WhichOneof("spec") for s in job.spec.pipeline.steps] == ["generate", "segment", "upscale", "outpaint"]
    assert spec_summary(job).startswith("generate: a knight → segment: the knight")
    await user.should_see("Step 1: generate · #0 · seed 2", retries=50)
    await user.should_see("Step 4: outpaint · #3", retries=50)
    await asyncio.sleep(0.5)  # the pipeline's "4/4 done" progress comes after its last output
    await user.should_not_see("Step 5")  # four cards, no fifth for that marker


async def test_history_and_approvals_come_back_after_a_reload(page):
    user, sdk = page
    fill(user, prompt="a lamp", width=32, height=32, steps=1, seed=9)
    job = await run(user, sdk)
    one(user, f"approve-{job.name}-0").value = True
    for _ in range(100):
        if (await sdk.get_job(job.name)).outputs[0].approved:
            break
        await asyncio.sleep(0.05)
    assert (await sdk.list_approved())[0].job == job.name
    await user.open("/")  # a reload: a new page, built from the server
    await user.should_see(marker=f"output-{job.name}-0", retries=100)
    await user.should_see(marker=f"approved-{job.name}-0", retries=100)
    assert one(user, f"approve-{job.name}-0").value is True
    await user.should_see(marker=f"queue-{job.name}")


async def test_queue_cancels_a_running_job_and_reload_reattaches(page):
    user, sdk = page
    long = sdk.generate("slow", width=256, height=256, steps=100, seed=1)
    await long
    async for p in long.progress():
        if p.stage == "denoising":
            break
    await user.open("/")
    await user.should_see(marker=f"job-{long.name}", retries=100)
    await user.should_see(marker=f"card-{long.name}-0", retries=100)  # re-attached: its live card
    await user.should_see(marker=f"queue-{long.name}", retries=100)
    with user:
        [button] = [b for b in user.find(kind=ui.button).elements if b.props.get("aria-label") == f"Cancel {long.name}"]
    UserInteraction(user, {button}, None).click()
    for _ in range(200):
        if (await sdk.get_job(long.name)).state == job_pb2.JOB_STATE_CANCELLED:
            break
        await asyncio.sleep(0.05)
    assert (await sdk.get_job(long.name)).state == job_pb2.JOB_STATE_CANCELLED
    await user.should_see("cancelled", retries=100)


async def test_gpu_panel_follows_the_status_stream_and_unloads(page):
    user, sdk = page
    await user.should_see("cpu", retries=50)
    await user.should_see("tiny")
    await sdk.generate("x", width=32, height=32, steps=1).wait()
    await user.should_see(marker="unload-flux-schnell", retries=50)
    UserInteraction(user, {one(user, "unload-flux-schnell")}, None).click()
    for _ in range(100):
        if not [m for m in (await sdk.status()).loaded_models if m.key == "flux-schnell"]:
            break
        await asyncio.sleep(0.05)
    await user.should_not_see(marker="unload-flux-schnell", retries=50)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_unreachable_server_shows_the_banner_and_reconnects(tmp_path, tiny_models_dir, monkeypatch):
    from paletta_server.config import load_config
    from paletta_server.server import PalettaServer

    monkeypatch.chdir(tmp_path)
    port = free_port()
    address = f"127.0.0.1:{port}"
    root = make_root(lambda: default_client(address), cache_dir=tmp_path / "cache")
    async with user_simulation(root=root) as user:
        await user.open("/")
        await user.should_see("paletta serve --profile tiny", retries=100)
        data = tmp_path / "data"
        link_tiny_models(data, tiny_models_dir)
        server = PalettaServer(load_config(data, env={}, host="127.0.0.1", port=port, profile="tiny"))
        await server.start()
        try:
            await user.should_not_see(marker="server-banner", retries=100)
            await user.should_see("tiny", retries=50)
        finally:
            await server.stop(0.5)


def test_mode_table_reads_the_proto_defaults():
    assert modes.MODES["edit"].styles and modes.MODES["generate"].styles and modes.MODES["identity"].styles
    assert not any(m.styles for k, m in modes.MODES.items() if k not in ("generate", "edit", "identity"))
    guidance = {k: f.default for k, m in modes.MODES.items() for f in m.fields if f.name == "guidance"}
    assert guidance == {"generate": None, "edit": 2.5, "inpaint": 30.0, "outpaint": 30.0, "qwen_edit": 4.0,
                        "control": 3.5, "identity": 4.0}
    assert modes.error_slot("styles[0].weight") == "styles"
    assert modes.error_slot("image_prompt.weight") == "image_prompt"
    assert modes.error_slot("steps[1].inpaint.mask") == "pipeline"
    assert modes.error_slot("steps") == "steps"
    assert modes.error_slot("face") == "image"  # identity's face photo is the input image slot
    # an identity step keeps its face (never taken from the pipeline)
    step = modes.step_spec(modes.MODES["identity"], modes.Inputs(prompt="a knight", image="assets/f"), {})
    assert (step.identity.face.asset, step.identity.prompt) == ("assets/f", "a knight")
    assert modes.missing_inputs(modes.MODES["identity"], modes.Inputs(prompt="x")) == {
        "image": "Add a face photo first (pick, drop or paste one)"}
