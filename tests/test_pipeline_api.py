"""PipelineService: generate → auto_mask → inpaint as one job, chaining images and masks."""

import json

import grpc
import pytest

from paletta.v1 import (
    background_pb2,
    edit_pb2,
    generate_pb2,
    image_pb2,
    inpaint_pb2,
    job_options_pb2,
    job_pb2,
    job_spec_pb2,
    pipeline_service_pb2_grpc,
    segment_pb2,
    upscale_pb2,
)
from tests.helpers import collect, download_image, error_reason, field_violations, png_bytes, upload

Step = job_spec_pb2.JobSpec
GEN = generate_pb2.GenerateRequest(prompt="a knight", width=64, height=48, steps=2, seed=3)


def stub(server):
    return pipeline_service_pb2_grpc.PipelineServiceStub(server.channel)


async def test_generate_auto_mask_inpaint_chain(server):
    request = job_spec_pb2.RunPipelineRequest(steps=[
        Step(generate=GEN),
        Step(segment=segment_pb2.SegmentRequest(text="the knight", threshold=0.0)),
        Step(inpaint=inpaint_pb2.InpaintRequest(prompt="obsidian armor", steps=2, seed=5)),
    ])
    events = await collect(stub(server).RunPipeline(request))
    job = events[-1].finished.job
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error.message
    outputs = [e.output for e in events if e.HasField("output")]
    params = [json.loads(o.parameters) for o in outputs]
    assert [(p["step"], p["step_capability"]) for p in params] == [(0, "generate"), (1, "segment"), (2, "inpaint")]
    generated, mask, inpainted = outputs
    assert (mask.asset.width, mask.asset.height) == (64, 48) and mask.segmentation.coverage == pytest.approx(1.0)
    assert (await download_image(server.channel, mask.asset.name)).mode == "L"
    assert (inpainted.asset.width, inpainted.asset.height) == (64, 48)
    assert params[2]["image"] == generated.asset.name and params[2]["mask"] == mask.asset.name
    stages = [(e.progress.step, e.progress.total_steps) for e in events
              if e.HasField("progress") and e.progress.stage == "pipeline"]
    assert stages == [(0, 3), (1, 3), (2, 3), (3, 3)]


async def test_starting_image_chains_through_upscale_and_edit(server):
    start = await upload(server.channel, png_bytes((32, 16)))
    request = job_spec_pb2.RunPipelineRequest(image=image_pb2.ImageRef(asset=start.name), steps=[
        Step(upscale=upscale_pb2.UpscaleRequest(upscaler=image_pb2.UPSCALER_LANCZOS, scale=2)),
        Step(edit=edit_pb2.EditRequest(prompt="make it night", steps=2, seed=1)),
    ])
    events = await collect(stub(server).RunPipeline(request))
    outputs = [e.output for e in events if e.HasField("output")]
    assert events[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert [(o.asset.width, o.asset.height) for o in outputs] == [(64, 32), (64, 32)]
    assert json.loads(outputs[1].parameters)["image"] == outputs[0].asset.name


async def test_remove_background_then_inpaint_gives_the_cut_out_a_new_backdrop(server):
    """The seed's flow as one job: the cut-out's transparent pixels are the inpaint's mask."""
    start = await upload(server.channel, png_bytes((48, 32)))
    request = job_spec_pb2.RunPipelineRequest(image=image_pb2.ImageRef(asset=start.name), steps=[
        Step(remove_background=background_pb2.RemoveBackgroundRequest()),
        Step(inpaint=inpaint_pb2.InpaintRequest(prompt="a beach backdrop", steps=1, seed=2)),
    ])
    events = await collect(stub(server).RunPipeline(request))
    job = events[-1].finished.job
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error.message
    cutout, backdrop = [e.output for e in events if e.HasField("output")]
    params = json.loads(backdrop.parameters)
    assert params["image"] == cutout.asset.name and params["mask"] == "transparent pixels of the image"
    assert not job.spec.pipeline.steps[1].inpaint.HasField("mask")

    # Through an upscale (it keeps the transparency), and from a starting image that is a cut-out.
    lanczos = upscale_pb2.UpscaleRequest(upscaler=image_pb2.UPSCALER_LANCZOS, scale=2)
    for image, steps in ((start.name, [Step(remove_background=background_pb2.RemoveBackgroundRequest()),
                                       Step(upscale=lanczos)]),
                         (cutout.asset.name, [])):
        request = job_spec_pb2.RunPipelineRequest(image=image_pb2.ImageRef(asset=image), steps=[
            *steps, Step(inpaint=inpaint_pb2.InpaintRequest(prompt="a beach backdrop", steps=1, seed=2))])
        job = (await collect(stub(server).RunPipeline(request)))[-1].finished.job
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error.message
        assert json.loads(job.outputs[-1].parameters)["mask"] == "transparent pixels of the image"


@pytest.mark.parametrize("steps, field", [
    ([Step(inpaint=inpaint_pb2.InpaintRequest(prompt="x"))], "steps[0].inpaint.image"),
    ([Step(generate=GEN), Step(inpaint=inpaint_pb2.InpaintRequest(prompt="x"))], "steps[1].inpaint.mask"),
    ([Step(remove_background=background_pb2.RemoveBackgroundRequest(image=image_pb2.ImageRef(inline=png_bytes()))),
      Step(generate=GEN), Step(inpaint=inpaint_pb2.InpaintRequest(prompt="x"))], "steps[2].inpaint.mask"),
    ([Step(generate=GEN), Step(generate=generate_pb2.GenerateRequest(prompt=""))], "steps[1].generate.prompt"),
    ([Step(generate=generate_pb2.GenerateRequest(prompt="a", options=job_options_pb2.JobOptions(request_id="r")))],
     "steps[0].generate.options"),
    ([Step(edit=edit_pb2.EditRequest(prompt="x"))], "steps[0].edit.image"),
    ([Step()], "steps[0]"),
    ([], "steps"),
])
async def test_every_step_is_validated_before_anything_runs(server, steps, field):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub(server).RunPipeline(job_spec_pb2.RunPipelineRequest(steps=steps)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value)
    assert server.app.store.count("QUEUED") + server.app.store.count("SUCCEEDED") == 0


async def test_auto_mask_that_selects_nothing_fails_the_inpaint_step(server):
    request = job_spec_pb2.RunPipelineRequest(steps=[
        Step(generate=GEN),
        Step(segment=segment_pb2.SegmentRequest(text="a dragon", threshold=1.0)),
        Step(inpaint=inpaint_pb2.InpaintRequest(prompt="fire", steps=2)),
    ])
    events = await collect(stub(server).RunPipeline(request))
    job = events[-1].finished.job
    assert job.state == job_pb2.JOB_STATE_FAILED
    assert job.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # The stored Status keeps its details: the field violation, not just the message.
    assert list(field_violations(job.error)) == ["steps[2].inpaint.mask"]
    assert error_reason(job.error) == "INVALID_ARGUMENT"
    assert len(job.outputs) == 2  # the generated image and the (empty) mask are kept


def test_pipeline_script_parses_the_seed_syntax():
    from paletta.pipeline import parse

    steps = parse("""
        [generate|tarot] knight in stormy mountain pass
        [auto_mask] the knight

        [inpaint] in obsidian cyborg armor
        [kontext|ghibsky:0.7] make it golden hour
        add film grain
    """)
    assert [s.WhichOneof("spec") for s in steps] == ["generate", "segment", "inpaint", "edit", "edit"]
    assert steps[0].generate.prompt == "knight in stormy mountain pass"
    assert [(x.name, x.HasField("weight")) for x in steps[0].generate.styles] == [("tarot", False)]
    assert steps[1].segment.text == "the knight"
    assert steps[3].edit.styles[0].name == "ghibsky" and steps[3].edit.styles[0].weight == pytest.approx(0.7)
    assert steps[4].edit.prompt == "add film grain"
    assert parse("make it night", has_image=True)[0].WhichOneof("spec") == "edit"
    with pytest.raises(ValueError, match="line 1: unknown mode 'paint'"):
        parse("[paint] a cat")


async def test_sdk_runs_a_pipeline_script(server):
    from paletta import AsyncClient

    client = AsyncClient(server.address)
    try:
        steps = [Step(generate=GEN), Step(upscale=upscale_pb2.UpscaleRequest(scale=2))]
        job = await client.pipeline(steps)
        outputs = [o async for o in job.outputs()]
    finally:
        await client.close()
    assert [json.loads(o.parameters)["step_capability"] for o in outputs] == ["generate", "upscale"]
    assert (outputs[1].asset.width, outputs[1].asset.height) == (128, 96)
