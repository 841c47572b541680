"""Bad input gets INVALID_ARGUMENT (or NOT_FOUND / RESOURCE_EXHAUSTED) naming the field; the server keeps serving."""

import io
import json

import grpc
import pytest
from PIL import Image

from paletta.v1 import asset_service_pb2 as asset_pb
from paletta.v1 import asset_service_pb2_grpc as asset_grpc
from paletta.v1 import generate_pb2 as gen
from paletta.v1 import generate_service_pb2_grpc as gen_grpc
from paletta.v1 import image_pb2, job_options_pb2, job_pb2, job_service_pb2, job_service_pb2_grpc
from tests.helpers import collect, error_reason, field_violations, png_bytes, upload

GOOD = dict(prompt="a knight", width=64, height=64, steps=2, seed=1)


@pytest.mark.parametrize("change, field", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="   "), "prompt"),
    (dict(width=0), "width"),
    (dict(height=0), "height"),
    (dict(steps=0), "steps"),
    (dict(variants=0), "variants"),
    (dict(width=-16), "width"),
    (dict(height=-1), "height"),
    (dict(width=100), "width"),
    (dict(height=2048), "height"),
    (dict(width=4096), "width"),
    (dict(steps=101), "steps"),
    (dict(steps=-1), "steps"),
    (dict(variants=9), "variants"),
    (dict(variants=-1), "variants"),
    (dict(guidance=-1.0), "guidance"),
])
async def test_generate_rejects_bad_fields(server, change, field):
    stub = gen_grpc.GenerateServiceStub(server.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.Generate(gen.GenerateRequest(**{**GOOD, **change})))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value)


async def test_unset_sizes_steps_and_variants_take_defaults(server):
    # Unset optional fields take defaults (an explicit 0 is refused above): 1024 capped to the
    # tiny profile's 1024, schnell's 4 steps, one variant.
    stub = gen_grpc.GenerateServiceStub(server.channel)
    events = await collect(stub.Generate(gen.GenerateRequest(prompt="a", seed=1)))
    out = [e.output for e in events if e.HasField("output")]
    assert len(out) == 1 and (out[0].asset.width, out[0].asset.height) == (1024, 1024)
    assert json.loads(out[0].parameters)["steps"] == 4


async def test_all_violations_reported_together(server):
    stub = gen_grpc.GenerateServiceStub(server.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.Generate(gen.GenerateRequest(prompt="", width=17, height=64, steps=500, variants=99)))
    assert {"prompt", "width", "steps", "variants"} <= set(field_violations(err.value))


async def test_unknown_and_malformed_assets(server):
    stub = asset_grpc.AssetServiceStub(server.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetAsset(asset_pb.GetAssetRequest(name="assets/" + "0" * 64))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for bad in ("../../etc/passwd", "assets/../../etc/passwd", "assets/xyz", ""):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetAsset(asset_pb.GetAssetRequest(name=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "name" in field_violations(err.value)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub.DownloadAsset(asset_pb.DownloadAssetRequest(name=bad)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_long_names_are_quoted_clipped_so_the_status_stays_in_the_trailers(server):
    """Errors quote what was sent; unclipped, a long name made the trailers too big for the client
    (grpc's own RESOURCE_EXHAUSTED, no ErrorInfo)."""
    jobs = job_service_pb2_grpc.JobServiceStub(server.channel)
    for name, code, reason in (("x" * 3000, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
                               ("jobs/" + "a" * 8000, grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await jobs.GetJob(job_service_pb2.GetJobRequest(name=name))
        assert err.value.code() == code and "name" in field_violations(err.value)
        assert error_reason(err.value) == reason and len(err.value.details().encode()) <= 512
    stub = gen_grpc.GenerateServiceStub(server.channel)
    styles = [image_pb2.StyleSelection(name="🎨" * 600 + str(i)) for i in range(20)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.Generate(gen.GenerateRequest(**GOOD, styles=styles)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(err.value)
    assert "styles[0].name" in violations and violations["…"].endswith(" more, not sent")  # counted, not sent
    assert error_reason(err.value) == "INVALID_ARGUMENT"


async def test_unknown_image_prompt_asset_is_not_found(server):
    stub = gen_grpc.GenerateServiceStub(server.channel)
    req = gen.GenerateRequest(**GOOD, image_prompt=image_pb2.ImagePrompt(
        image=image_pb2.ImageRef(asset="assets/" + "a" * 64)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.Generate(req))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "image_prompt.image.asset" in field_violations(err.value)


async def test_corrupt_image_and_decompression_bomb(server):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(server.channel, b"\x89PNG\r\n\x1a\nthis is not a png")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "data" in field_violations(err.value)
    truncated = png_bytes((64, 64))[:-40]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(server.channel, truncated)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A tiny file that declares 30000 x 30000 pixels: refused from the header, never decoded.
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 200_000
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(server.channel, bomb.getvalue())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pixel" in field_violations(err.value)["data"]


async def test_upload_over_size_limit(server_factory):
    handle = await server_factory(max_upload_bytes=10_000)
    big = io.BytesIO()
    Image.effect_noise((200, 200), 64).save(big, format="PNG")
    assert len(big.getvalue()) > 10_000
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(handle.channel, big.getvalue(), chunk=4096)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(err.value) == "ASSET_TOO_LARGE" and "data" in field_violations(err.value)


async def test_server_keeps_serving_after_bad_input(server):
    stub = gen_grpc.GenerateServiceStub(server.channel)
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError):
            await collect(stub.Generate(gen.GenerateRequest(prompt="")))
    events = await collect(stub.Generate(gen.GenerateRequest(**GOOD)))
    assert events[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED


def png_with_broken_pixels() -> bytes:
    """A PNG whose chunks all carry valid CRCs but whose IDAT is not a zlib stream."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"garbage" * 50) + chunk(b"IEND", b"")


async def test_png_with_valid_crcs_but_broken_pixels_is_refused(server):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(server.channel, png_with_broken_pixels())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "data" in field_violations(err.value)


async def test_corrupt_inline_image_names_the_field(server):
    stub = gen_grpc.GenerateServiceStub(server.channel)
    req = gen.GenerateRequest(**GOOD, image_prompt=image_pb2.ImagePrompt(
        image=image_pb2.ImageRef(inline=png_with_broken_pixels())))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.Generate(req))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image_prompt.image.inline" in field_violations(err.value)


async def test_sixteen_bit_images_are_an_unsupported_mode(server):
    buf = io.BytesIO()
    Image.new("I;16", (32, 32), 40000).save(buf, format="PNG")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(server.channel, buf.getvalue())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mode" in field_violations(err.value)["data"]


async def test_unknown_priority(server):
    stub = gen_grpc.GenerateServiceStub(server.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.Generate(gen.GenerateRequest(**GOOD, options=job_options_pb2.JobOptions(priority=99))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "options.priority" in field_violations(err.value)



async def test_a_style_listed_twice_is_refused(server):
    stub = gen_grpc.GenerateServiceStub(server.channel)
    twice = [image_pb2.StyleSelection(name="tarot", weight=0.5), image_pb2.StyleSelection(name="tarot")]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.Generate(gen.GenerateRequest(**GOOD, styles=twice)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "styles[1].name" in field_violations(err.value)
