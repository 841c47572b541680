"""Diffusion capabilities end to end on tiny models through a real aio server: Kontext edit, Fill
inpaint/outpaint, Qwen edit, ControlNet, IP-Adapter and style LoRAs; sizes, events, cancel, weights, bad input."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
from PIL import Image

from paletta.v1 import control_pb2 as ctl
from paletta.v1 import control_service_pb2_grpc as ctl_grpc
from paletta.v1 import edit_pb2 as edit_pb
from paletta.v1 import edit_service_pb2_grpc as edit_grpc
from paletta.v1 import generate_pb2 as gen
from paletta.v1 import generate_service_pb2_grpc as gen_grpc
from paletta.v1 import image_pb2, job_pb2, job_service_pb2, job_service_pb2_grpc
from paletta.v1 import inpaint_pb2 as inp
from paletta.v1 import inpaint_service_pb2_grpc as inp_grpc
from paletta.v1 import qwen_edit_pb2 as qwen_pb
from paletta.v1 import qwen_edit_service_pb2_grpc as qwen_grpc
from tests.helpers import collect, download_image, field_violations, kinds


def encode(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def picture(size=(96, 64)) -> Image.Image:
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.uint8)
    y = np.linspace(0, 255, h, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (h, 1)), np.tile(y[:, None], (1, w)), np.full((h, w), 70, np.uint8)], axis=-1)
    return Image.fromarray(rgb, "RGB")


def ref(image: Image.Image) -> image_pb2.ImageRef:
    return image_pb2.ImageRef(inline=encode(image))


def square_mask(size, box) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def outputs(events):
    return [e.output for e in events if e.HasField("output")]


async def pixels(server, events) -> list[np.ndarray]:
    return [np.asarray((await download_image(server.channel, o.asset.name)).convert("RGB"), dtype=np.int16)
            for o in outputs(events)]


def assert_well_formed(events, variants: int, total_steps: int):
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    names = kinds(events)
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "finished"
    denoise = [e.progress for e in events if e.HasField("progress") and e.progress.stage == "denoising"]
    assert [p.step for p in denoise] == list(range(1, total_steps + 1)) * variants
    assert events[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert len(outputs(events)) == variants


# -- capabilities: sizes, events, parameters -------------------------------------------------------
async def test_edit_restores_upload_size_with_variants_and_seeds(server):
    stub = edit_grpc.EditServiceStub(server.channel)
    events = await collect(stub.Edit(edit_pb.EditRequest(
        image=ref(picture((640, 320))), prompt="make it night", steps=2, seed=9, variants=2)))
    assert_well_formed(events, 2, 2)
    outs = outputs(events)
    assert [o.seed for o in outs] == [9, 10]
    for out in outs:
        assert (out.asset.width, out.asset.height) == (640, 320)
        params = json.loads(out.parameters)
        assert params["capability"] == "edit" and params["model"] == "flux-kontext"
        assert params["inference_size"] == [512, 256] and params["output_size"] == [640, 320]
        assert params["upscaler"] == "lanczos" and params["guidance"] == 2.5


async def test_inpaint_resizes_a_smaller_mask_and_keeps_unmasked_pixels(server):
    stub = inp_grpc.InpaintServiceStub(server.channel)
    image = picture((96, 64))
    mask = square_mask((48, 32), (12, 8, 36, 24))  # half size: resized to 96x64 → box (24,16)-(72,48)
    events = await collect(stub.Inpaint(inp.InpaintRequest(
        image=ref(image), mask=ref(mask), prompt="a red door", steps=2, seed=1)))
    assert_well_formed(events, 1, 2)
    out = outputs(events)[0]
    params = json.loads(out.parameters)
    assert (out.asset.width, out.asset.height) == (96, 64)
    assert params["mask_resized"] is True and params["mask_size"] == [48, 32] and params["composited"] is True
    got = (await pixels(server, events))[0]
    original = np.asarray(image, dtype=np.int16)
    assert (got[:10] == original[:10]).all() and (got[:, :20] == original[:, :20]).all()
    assert not (got[20:44, 28:68] == original[20:44, 28:68]).all()


async def test_inpaint_without_a_mask_repaints_the_transparent_pixels_of_a_cut_out(server):
    """The seed's flow: remove the background, then give the cut-out a new backdrop with Fill."""
    stub = inp_grpc.InpaintServiceStub(server.channel)
    cutout = picture((96, 64)).convert("RGBA")
    cutout.putalpha(square_mask((96, 64), (24, 16, 72, 48)))  # the subject: opaque; around it: transparent
    events = await collect(stub.Inpaint(inp.InpaintRequest(image=ref(cutout), prompt="a beach", steps=2, seed=1)))
    assert_well_formed(events, 1, 2)
    assert json.loads(outputs(events)[0].parameters)["mask"] == "transparent pixels of the image"
    got = (await pixels(server, events))[0]
    subject = np.asarray(cutout.convert("RGB"), dtype=np.int16)[16:48, 24:72]
    assert (got[16:48, 24:72] == subject).all()  # the opaque subject is kept exactly
    assert not (got[:16] == np.asarray(cutout.convert("RGB"), dtype=np.int16)[:16]).all()  # the backdrop is new
    # An image without transparent pixels still needs a mask: said on `mask`.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.Inpaint(inp.InpaintRequest(image=ref(picture((96, 64))), prompt="a beach")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unless the image has transparent pixels" in field_violations(err.value)["mask"]


async def test_outpaint_builds_canvas_and_mask_on_the_server(server):
    stub = inp_grpc.InpaintServiceStub(server.channel)
    image = picture((64, 48))
    events = await collect(stub.Outpaint(inp.OutpaintRequest(
        image=ref(image), prompt="", left=16, right=0, top=0, bottom=16, feather=4, steps=2, seed=3)))
    assert_well_formed(events, 1, 2)
    out = outputs(events)[0]
    assert (out.asset.width, out.asset.height) == (80, 64)
    params = json.loads(out.parameters)
    assert params["canvas"] == [80, 64] and params["left"] == 16 and params["bottom"] == 16
    got = (await pixels(server, events))[0]
    # the original stays (away from the feathered seam); the new strip is generated
    assert (got[:32, 32:80] == np.asarray(image, dtype=np.int16)[:32, 16:64]).all()
    assert np.abs(got[:, :12] - np.asarray(image, dtype=np.int16)[:, :1].repeat(12, 1).mean()).mean() > 1


async def test_qwen_edit_sizes_and_events(server):
    stub = qwen_grpc.QwenEditServiceStub(server.channel)
    events = await collect(stub.Edit(qwen_pb.QwenEditServiceEditRequest(
        image=ref(picture((80, 48))), prompt="make it snowy", negative_prompt="blurry", steps=2, seed=4)))
    assert_well_formed(events, 1, 2)
    out = outputs(events)[0]
    assert (out.asset.width, out.asset.height) == (80, 48)
    params = json.loads(out.parameters)
    assert params["model"] == "qwen-image-edit" and params["guidance"] == 4.0 and params["negative_prompt"] == "blurry"


async def control_run(stub, **kw):
    base = dict(control_image=ref(picture((64, 64))), prompt="a robot", control_type=ctl.CONTROL_TYPE_CANNY,
                steps=2, seed=5)
    return await collect(stub.Control(ctl.ControlRequest(**{**base, **kw})))


async def test_control_sizes_types_scale_and_canny_preprocessing(server):
    stub = ctl_grpc.ControlServiceStub(server.channel)
    canny = await control_run(stub, preprocess=ctl.PREPROCESS_CANNY, width=96, height=64)
    assert_well_formed(canny, 1, 2)
    out = outputs(canny)[0]
    params = json.loads(out.parameters)
    assert (out.asset.width, out.asset.height) == (96, 64)
    assert params["control_mode"] == 0 and params["control_scale"] == 0.7 and params["preprocess"] == "canny"
    runs = {}
    for name, kw in {"canny": {}, "depth": dict(control_type=ctl.CONTROL_TYPE_DEPTH),
                     "pose": dict(control_type=ctl.CONTROL_TYPE_POSE), "strong": dict(control_scale=1.0),
                     "off_canny": dict(control_scale=0.0),
                     "off_pose": dict(control_scale=0.0, control_type=ctl.CONTROL_TYPE_POSE)}.items():
        runs[name] = (await pixels(server, await control_run(stub, **kw)))[0]
    assert json.loads(outputs(await control_run(stub, control_type=ctl.CONTROL_TYPE_POSE))[0].parameters)[
        "control_mode"] == 4
    distinct = {runs[k].tobytes() for k in ("canny", "depth", "pose", "strong", "off_canny")}
    assert len(distinct) == 5
    assert (runs["off_canny"] == runs["off_pose"]).all()  # scale 0 == no control, whatever the mode


# -- cancel -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("capability", ["edit", "inpaint", "outpaint", "qwen_edit", "control"])
async def test_cancel_mid_run(server, capability):
    steps = 60
    image = ref(picture((64, 64)))
    calls = {
        "edit": lambda: edit_grpc.EditServiceStub(server.channel).Edit(
            edit_pb.EditRequest(image=image, prompt="x", steps=steps, seed=1)),
        "inpaint": lambda: inp_grpc.InpaintServiceStub(server.channel).Inpaint(inp.InpaintRequest(
            image=image, mask=ref(square_mask((64, 64), (0, 0, 32, 32))), prompt="x", steps=steps, seed=1)),
        "outpaint": lambda: inp_grpc.InpaintServiceStub(server.channel).Outpaint(inp.OutpaintRequest(
            image=image, left=16, steps=steps, seed=1)),
        "qwen_edit": lambda: qwen_grpc.QwenEditServiceStub(server.channel).Edit(
            qwen_pb.QwenEditServiceEditRequest(image=image, prompt="x", steps=steps, seed=1)),
        "control": lambda: ctl_grpc.ControlServiceStub(server.channel).Control(ctl.ControlRequest(
            control_image=image, prompt="x", control_type=ctl.CONTROL_TYPE_DEPTH, steps=steps, seed=1)),
    }
    stream = calls[capability]()
    jobs = job_service_pb2_grpc.JobServiceStub(server.channel)
    name = None
    while True:
        event = await stream.read()
        name = event.job
        if event.HasField("progress") and event.progress.stage == "denoising":
            break
    await jobs.CancelJob(job_service_pb2.CancelJobRequest(name=name))
    rest = await collect(stream)
    finished = rest[-1].finished.job
    assert finished.state == job_pb2.JOB_STATE_CANCELLED and not finished.outputs
    assert max((e.progress.step for e in rest if e.HasField("progress")), default=0) < steps


# -- weights: styles, image prompt ------------------------------------------------------------------
def styled(*pairs):
    return [image_pb2.StyleSelection(name=n, weight=w) for n, w in pairs]


async def test_styles_change_output_zero_is_baseline_and_never_reload_the_base(server):
    stub = gen_grpc.GenerateServiceStub(server.channel)
    base = dict(prompt="a castle", width=64, height=64, steps=2, seed=21)

    async def run(*pairs):
        events = await collect(stub.Generate(gen.GenerateRequest(**base, styles=styled(*pairs))))
        return (await pixels(server, events))[0], json.loads(outputs(events)[0].parameters)

    baseline, _ = await run()
    zero, params = await run(("ghibsky", 0.0))
    assert (zero == baseline).all() and params["effective_prompt"] == "a castle"  # weight 0 = off
    _, params = await run(("ghibsky", 0.5))
    assert params["effective_prompt"] == "GHIBSKY style, a castle" and params["styles"][0]["weight"] == 0.5
    seen = {baseline.tobytes()}
    for pairs in [(("realism", 1.0),), (("realism", 1.6),), (("koda", 1.0),), (("tarot", 1.0), ("anime", 0.8))]:
        image, params = await run(*pairs)
        assert [s["name"] for s in params["styles"]] == [n for n, _ in pairs]
        seen.add(image.tobytes())
    assert len(seen) == 5
    again, _ = await run()
    assert (again == baseline).all()  # styles are switched off after each job
    assert server.app.residency.load_counts["flux-schnell"] == 1

    edit = edit_grpc.EditServiceStub(server.channel)
    req = dict(image=ref(picture((64, 64))), prompt="make it gold", steps=2, seed=2)
    plain = await pixels(server, await collect(edit.Edit(edit_pb.EditRequest(**req))))
    off = await pixels(server, await collect(edit.Edit(edit_pb.EditRequest(**req, styles=styled(("tarot", 0.0))))))
    on = await pixels(server, await collect(edit.Edit(edit_pb.EditRequest(**req, styles=styled(("tarot", 1.0))))))
    assert (plain[0] == off[0]).all() and not (plain[0] == on[0]).all()
    assert server.app.residency.load_counts["flux-kontext"] == 1


async def test_image_prompt_weight_changes_output_and_zero_is_baseline(server):
    reference = ref(picture((64, 64)).transpose(Image.Transpose.ROTATE_90))
    gen_stub = gen_grpc.GenerateServiceStub(server.channel)
    base = dict(prompt="a lake", width=64, height=64, steps=2, seed=8)

    async def generate(weight=None):
        extra = {}
        if weight is not None:
            extra["image_prompt"] = image_pb2.ImagePrompt(image=reference, weight=weight)
        events = await collect(gen_stub.Generate(gen.GenerateRequest(**base, **extra)))
        return (await pixels(server, events))[0], json.loads(outputs(events)[0].parameters)

    baseline, _ = await generate()
    zero, _ = await generate(0.0)
    strong, params = await generate(1.0)
    assert (zero == baseline).all() and not (strong == baseline).all()
    assert params["image_prompt"]["weight"] == 1.0
    after, _ = await generate()
    assert (after == baseline).all()

    ctl_stub = ctl_grpc.ControlServiceStub(server.channel)
    plain = await pixels(server, await control_run(ctl_stub))
    zero_c = await pixels(server, await control_run(ctl_stub, image_prompt=image_pb2.ImagePrompt(
        image=reference, weight=0.0)))
    with_ip = await pixels(server, await control_run(ctl_stub, image_prompt=image_pb2.ImagePrompt(image=reference)))
    assert (plain[0] == zero_c[0]).all() and not (plain[0] == with_ip[0]).all()

    edit = edit_grpc.EditServiceStub(server.channel)
    req = dict(image=ref(picture((64, 64))), prompt="x", steps=2, seed=2)
    e_plain = await pixels(server, await collect(edit.Edit(edit_pb.EditRequest(**req))))
    e_ip = await pixels(server, await collect(edit.Edit(edit_pb.EditRequest(
        **req, image_prompt=image_pb2.ImagePrompt(image=reference, weight=1.2)))))
    assert not (e_plain[0] == e_ip[0]).all()


# -- bad input --------------------------------------------------------------------------------------
IMG = picture((64, 64))
BLACK = Image.new("L", (64, 64), 0)


def bad_cases():
    good_ip = image_pb2.ImagePrompt(image=image_pb2.ImageRef(inline=encode(IMG)))
    edit = dict(image=image_pb2.ImageRef(inline=encode(IMG)), prompt="x", steps=2)
    inpaint = dict(image=image_pb2.ImageRef(inline=encode(IMG)),
                   mask=image_pb2.ImageRef(inline=encode(square_mask((64, 64), (0, 0, 8, 8)))), prompt="x", steps=2)
    outpaint = dict(image=image_pb2.ImageRef(inline=encode(IMG)), left=16, steps=2)
    qwen = dict(image=image_pb2.ImageRef(inline=encode(IMG)), prompt="x", steps=2)
    control = dict(control_image=image_pb2.ImageRef(inline=encode(IMG)), prompt="x",
                   control_type=ctl.CONTROL_TYPE_CANNY, steps=2)
    return [
        ("inpaint", {**inpaint, "mask": image_pb2.ImageRef(inline=encode(BLACK))}, "mask"),
        ("inpaint", {**inpaint, "mask": image_pb2.ImageRef()}, "mask"),
        ("inpaint", {**inpaint, "feather": 300}, "feather"),
        ("inpaint", {**inpaint, "styles": styled(("tarot", 1.0))}, "styles"),
        ("outpaint", {**outpaint, "left": 0}, "left"),
        ("outpaint", {**outpaint, "left": 0}, "bottom"),
        ("outpaint", {**outpaint, "right": 5000}, "right"),
        ("outpaint", {**outpaint, "styles": styled(("koda", 1.0))}, "styles"),
        ("edit", {**edit, "styles": styled(("nope", 1.0))}, "styles[0].name"),
        ("edit", {**edit, "styles": styled(("tarot", 2.5))}, "styles[0].weight"),
        ("edit", {**edit, "styles": styled(("tarot", -0.1))}, "styles[0].weight"),
        ("edit", {**edit, "image": image_pb2.ImageRef()}, "image"),
        ("edit", {**edit, "prompt": ""}, "prompt"),
        ("edit", {**edit, "upscaler": 7}, "upscaler"),
        ("edit", {**edit, "image_prompt": image_pb2.ImagePrompt(image=good_ip.image, weight=2.5)},
         "image_prompt.weight"),
        ("edit", {**edit, "image_prompt": image_pb2.ImagePrompt(weight=1.0)}, "image_prompt.image"),
        ("qwen_edit", {**qwen, "styles": styled(("anime", 1.0))}, "styles"),
        ("qwen_edit", {**qwen, "guidance": 0.5}, "guidance"),
        ("control", {**control, "control_type": ctl.CONTROL_TYPE_UNSPECIFIED}, "control_type"),
        ("control", {**control, "control_type": 9}, "control_type"),
        ("control", {**control, "control_image": image_pb2.ImageRef()}, "control_image"),
        ("control", {**control, "control_scale": 1.5}, "control_scale"),
        ("control", {**control, "styles": styled(("tarot", 1.0))}, "styles"),
        ("control", {**control, "image_prompt": image_pb2.ImagePrompt(image=good_ip.image, weight=-1.0)},
         "image_prompt.weight"),
        ("control", {**control, "control_type": ctl.CONTROL_TYPE_DEPTH, "preprocess": ctl.PREPROCESS_CANNY},
         "preprocess"),
        ("control", {**control, "width": 100}, "width"),
        ("generate", dict(prompt="x", width=64, height=64, styles=styled(("tarot", 3.0))), "styles[0].weight"),
        ("generate", dict(prompt="x", width=64, height=64, image_prompt=image_pb2.ImagePrompt(
            image=good_ip.image, weight=2.01)), "image_prompt.weight"),
    ]


def call(server, capability, fields):
    ch = server.channel
    return {
        "edit": lambda: edit_grpc.EditServiceStub(ch).Edit(edit_pb.EditRequest(**fields)),
        "inpaint": lambda: inp_grpc.InpaintServiceStub(ch).Inpaint(inp.InpaintRequest(**fields)),
        "outpaint": lambda: inp_grpc.InpaintServiceStub(ch).Outpaint(inp.OutpaintRequest(**fields)),
        "qwen_edit": lambda: qwen_grpc.QwenEditServiceStub(ch).Edit(qwen_pb.QwenEditServiceEditRequest(**fields)),
        "control": lambda: ctl_grpc.ControlServiceStub(ch).Control(ctl.ControlRequest(**fields)),
        "generate": lambda: gen_grpc.GenerateServiceStub(ch).Generate(gen.GenerateRequest(**fields)),
    }[capability]()


async def test_bad_input_names_the_field_and_the_server_keeps_serving(server):
    failures = []
    for capability, fields, field in bad_cases():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(call(server, capability, fields))
        violations = field_violations(err.value)
        if err.value.code() != grpc.StatusCode.INVALID_ARGUMENT or field not in violations:
            failures.append((capability, field, err.value.code(), violations))
    assert not failures
    events = await collect(call(server, "edit", dict(image=ref(IMG), prompt="x", steps=1, seed=1)))
    assert events[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED
