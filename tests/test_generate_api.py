"""GenerateService end to end on the tiny FLUX.1-schnell, through a real aio server."""

import io
import json

from PIL import Image

from paletta.v1 import generate_pb2 as gen
from paletta.v1 import generate_service_pb2_grpc as gen_grpc
from paletta.v1 import job_pb2
from tests.helpers import collect, download, download_image, kinds


async def test_generate_streams_ordered_events_and_outputs(server):
    stub = gen_grpc.GenerateServiceStub(server.channel)
    events = await collect(stub.Generate(gen.GenerateRequest(
        prompt="a knight", width=96, height=64, steps=4, seed=7, variants=2)))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert len({e.job for e in events}) == 1 and events[0].job.startswith("jobs/")
    names = kinds(events)
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "finished"
    denoise = [e.progress for e in events if e.HasField("progress") and e.progress.stage == "denoising"]
    assert [p.step for p in denoise] == [1, 2, 3, 4] * 2 and {p.total_steps for p in denoise} == {4}
    outputs = [e.output for e in events if e.HasField("output")]
    assert [o.index for o in outputs] == [0, 1] and [o.seed for o in outputs] == [7, 8]
    for out in outputs:
        assert (out.asset.width, out.asset.height, out.asset.mime) == (96, 64, "image/png")
        assert out.asset.name.startswith("assets/") and len(out.asset.name) == len("assets/") + 64
        params = json.loads(out.parameters)
        assert params["seed"] == out.seed and params["steps"] == 4 and params["prompt"] == "a knight"
    finished = events[-1].finished.job
    assert finished.state == job_pb2.JOB_STATE_SUCCEEDED and len(finished.outputs) == 2
    assert finished.last_seq == events[-1].seq
    assert outputs[0].asset.name != outputs[1].asset.name


async def test_output_png_carries_effective_parameters(server):
    stub = gen_grpc.GenerateServiceStub(server.channel)
    events = await collect(stub.Generate(gen.GenerateRequest(prompt="a fox", width=64, height=64, steps=2, seed=3)))
    out = next(e.output for e in events if e.HasField("output"))
    image = await download_image(server.channel, out.asset.name)
    assert image.size == (64, 64)
    assert json.loads(image.text["parameters"]) == json.loads(out.parameters)
    assert json.loads(out.parameters)["capability"] == "generate"


async def test_same_seed_same_image_and_content_addressing(server):
    stub = gen_grpc.GenerateServiceStub(server.channel)
    req = gen.GenerateRequest(prompt="a tower", width=64, height=64, steps=2, seed=11)
    first = [e.output for e in await collect(stub.Generate(req)) if e.HasField("output")][0]
    again = [e.output for e in await collect(stub.Generate(req)) if e.HasField("output")][0]
    other = [e.output for e in await collect(stub.Generate(gen.GenerateRequest(
        prompt="a tower", width=64, height=64, steps=2, seed=12))) if e.HasField("output")][0]
    a = Image.open(io.BytesIO(await download(server.channel, first.asset.name))).tobytes()
    b = Image.open(io.BytesIO(await download(server.channel, again.asset.name))).tobytes()
    c = Image.open(io.BytesIO(await download(server.channel, other.asset.name))).tobytes()
    assert a == b and a != c


async def test_previews_are_small_jpegs(server):
    stub = gen_grpc.GenerateServiceStub(server.channel)
    events = await collect(stub.Generate(gen.GenerateRequest(prompt="x", width=512, height=384, steps=6, seed=1)))
    previews = [e.preview for e in events if e.HasField("preview")]
    assert previews, "a 6-step job sends previews"
    for p in previews:
        img = Image.open(io.BytesIO(p.jpeg))
        assert img.format == "JPEG" and max(img.size) <= 256 and img.size[0] > img.size[1]


async def test_unset_seed_is_random_but_reported(server):
    stub = gen_grpc.GenerateServiceStub(server.channel)
    seeds = set()
    for _ in range(2):
        events = await collect(stub.Generate(gen.GenerateRequest(prompt="y", width=64, height=64, steps=1)))
        seeds.add(next(e.output.seed for e in events if e.HasField("output")))
    assert len(seeds) == 2


async def test_model_loads_once_and_shows_in_events(server):
    stub = gen_grpc.GenerateServiceStub(server.channel)
    first = await collect(stub.Generate(gen.GenerateRequest(prompt="a", width=64, height=64, steps=1, seed=1)))
    second = await collect(stub.Generate(gen.GenerateRequest(prompt="b", width=64, height=64, steps=1, seed=1)))
    loading = [e.progress for e in first if e.HasField("progress") and e.progress.stage == "loading"]
    assert [(p.model, p.step) for p in loading] == [("flux-schnell", 0), ("flux-schnell", 1)]
    assert not [e for e in second if e.HasField("progress") and e.progress.stage == "loading"]
    assert server.app.residency.load_counts["flux-schnell"] == 1
