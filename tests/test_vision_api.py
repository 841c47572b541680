"""Vision and helper services end to end through a real aio server on tiny models."""

from __future__ import annotations

import json

import grpc
import pytest

from paletta.v1 import background_pb2 as bg
from paletta.v1 import background_service_pb2_grpc as bg_grpc
from paletta.v1 import caption_pb2 as cap
from paletta.v1 import caption_service_pb2_grpc as cap_grpc
from paletta.v1 import detect_pb2 as det
from paletta.v1 import detect_service_pb2_grpc as det_grpc
from paletta.v1 import image_pb2, job_options_pb2, job_pb2
from paletta.v1 import prompt_pb2 as prm
from paletta.v1 import prompt_service_pb2_grpc as prm_grpc
from paletta.v1 import segment_pb2 as seg
from paletta.v1 import segment_service_pb2_grpc as seg_grpc
from paletta.v1 import upscale_pb2 as up
from paletta.v1 import upscale_service_pb2_grpc as up_grpc
from tests.helpers import collect, download_image, error_reason, field_violations, png_bytes

W, H = 96, 64  # the tiny_image_bytes fixture


def ref(data: bytes) -> image_pb2.ImageRef:
    return image_pb2.ImageRef(inline=data)


def outputs(events: list[job_pb2.JobEvent]) -> list[job_pb2.JobOutput]:
    return [e.output for e in events if e.HasField("output")]


def succeeded(events: list[job_pb2.JobEvent]) -> job_pb2.Job:
    job = events[-1].finished.job
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error.message
    return job


async def test_upscale_realesrgan_tiles_with_progress(server, tiny_image_bytes):
    stub = up_grpc.UpscaleServiceStub(server.channel)
    events = await collect(stub.Upscale(up.UpscaleRequest(image=ref(tiny_image_bytes), tile=32, overlap=8)))
    job = succeeded(events)
    assert job.capability == "upscale" and job.priority == job_options_pb2.PRIORITY_NORMAL
    tiles = [e.progress for e in events if e.HasField("progress") and e.progress.stage == "tiling"]
    assert [p.step for p in tiles] == list(range(0, 7)) and {p.total_steps for p in tiles} == {6}  # 3 x 2 tiles
    loading = [e.progress.model for e in events if e.HasField("progress") and e.progress.stage == "loading"]
    assert loading == ["realesrgan-x4plus", "realesrgan-x4plus"]
    (out,) = outputs(events)
    assert (out.asset.width, out.asset.height) == (4 * W, 4 * H)
    params = json.loads(out.parameters)
    assert params["upscaler"] == "realesrgan" and params["scale"] == 4 and params["tile"] == 32
    image = await download_image(server.channel, out.asset.name)
    assert image.size == (4 * W, 4 * H) and image.mode == "RGB"


async def test_upscale_lanczos_any_scale(server, tiny_image_bytes):
    stub = up_grpc.UpscaleServiceStub(server.channel)
    events = await collect(stub.Upscale(up.UpscaleRequest(
        image=ref(tiny_image_bytes), upscaler=image_pb2.UPSCALER_LANCZOS, scale=1.5)))
    succeeded(events)
    assert not [e for e in events if e.HasField("progress") and e.progress.stage == "loading"]
    (out,) = outputs(events)
    assert (out.asset.width, out.asset.height) == (144, 96)


@pytest.mark.rembg
async def test_remove_background_rgba_and_mask(server, tiny_image_bytes):
    stub = bg_grpc.BackgroundServiceStub(server.channel)
    events = await collect(stub.RemoveBackground(bg.RemoveBackgroundRequest(
        image=ref(tiny_image_bytes), return_mask=True)))
    succeeded(events)
    cutout, mask = outputs(events)
    a = await download_image(server.channel, cutout.asset.name)
    m = await download_image(server.channel, mask.asset.name)
    assert a.mode == "RGBA" and a.size == (W, H) and cutout.asset.mime == "image/png"
    assert m.mode == "L" and m.size == (W, H)
    assert a.getchannel("A").tobytes() == m.tobytes()


async def test_segment_mask_at_input_size(server):
    stub = seg_grpc.SegmentServiceStub(server.channel)
    data = png_bytes((150, 84))
    events = await collect(stub.Segment(seg.SegmentRequest(image=ref(data), text="the sky", dilate=2, feather=1)))
    job = succeeded(events)
    assert job.priority == job_options_pb2.PRIORITY_HIGH
    (out,) = outputs(events)
    assert out.HasField("segmentation") and 0.0 <= out.segmentation.coverage <= 1.0
    mask = await download_image(server.channel, out.asset.name)
    assert mask.mode == "L" and mask.size == (150, 84)
    params = json.loads(out.parameters)
    assert params["threshold"] == 0.4 and params["text"] == "the sky" and params["dilate"] == 2


async def test_detect_and_ground_boxes_in_original_coordinates(server):
    stub = det_grpc.DetectServiceStub(server.channel)
    data = png_bytes((150, 84), (120, 200, 40))
    events = await collect(stub.Detect(det.DetectRequest(image=ref(data), threshold=0.0)))
    assert succeeded(events).priority == job_options_pb2.PRIORITY_HIGH
    (out,) = outputs(events)
    assert not out.HasField("asset") and out.HasField("detections")
    found = out.detections
    assert (found.image_width, found.image_height) == (150, 84) and found.detections
    for d in found.detections:
        assert 0 <= d.box.x_min < d.box.x_max <= 150 and 0 <= d.box.y_min < d.box.y_max <= 84
    assert [d.score for d in found.detections] == sorted((d.score for d in found.detections), reverse=True)

    events = await collect(stub.Ground(det.GroundRequest(image=ref(data), queries=["the dragon", "a tree"],
                                                         threshold=0.0)))
    succeeded(events)
    (out,) = outputs(events)
    boxes = out.detections.detections
    assert boxes and {d.label for d in boxes} <= {"the dragon", "a tree"}
    # OWLv2's prior-box grid over the padded 150 px square (cells of 37.5 px offset by half a cell):
    # 4 columns, and 2 rows reach into the 84-px-high image; boxes are clipped to it.
    assert len(boxes) == 8
    assert max(d.box.x_max for d in boxes) == 150 and max(d.box.y_max for d in boxes) == 84


async def test_caption_fast_deep_and_analyze(server, tiny_image_bytes):
    stub = cap_grpc.CaptionServiceStub(server.channel)
    events = await collect(stub.Caption(cap.CaptionRequest(image=ref(tiny_image_bytes), max_tokens=8)))
    assert succeeded(events).priority == job_options_pb2.PRIORITY_HIGH
    (out,) = outputs(events)
    assert out.HasField("caption") and json.loads(out.parameters)["model"] == "blip-large"
    events = await collect(stub.Caption(cap.CaptionRequest(image=ref(tiny_image_bytes),
                                                           depth=cap.CAPTION_DEPTH_DEEP, max_tokens=24)))
    succeeded(events)
    (out,) = outputs(events)
    assert out.caption.text and json.loads(out.parameters)["model"] == "blip2-opt-2.7b"
    events = await collect(stub.Analyze(cap.AnalyzeRequest(image=ref(tiny_image_bytes), threshold=0.0)))
    succeeded(events)
    (out,) = outputs(events)
    objects = list(out.caption.objects)
    assert objects and len(objects) == len(set(objects)) and "N/A" not in objects
    from paletta_server.engines.tiny.vision import COCO_LABELS

    assert set(objects) <= set(COCO_LABELS)


async def test_expand_is_deterministic_for_a_seed(server):
    stub = prm_grpc.PromptServiceStub(server.channel)

    async def expand(seed: int | None) -> job_pb2.JobOutput:
        request = prm.ExpandRequest(prompt="knight in forest", max_tokens=20)
        if seed is not None:
            request.seed = seed
        events = await collect(stub.Expand(request))
        assert succeeded(events).priority == job_options_pb2.PRIORITY_HIGH
        return outputs(events)[0]

    first, again, unset = await expand(5), await expand(5), await expand(None)
    assert first.expansion.original == "knight in forest" and first.expansion.expanded
    assert first.expansion.expanded == again.expansion.expanded and first.seed == 5
    assert unset.seed == 0 and unset.expansion.expanded == (await expand(0)).expansion.expanded


BAD = [
    (up_grpc.UpscaleServiceStub, "Upscale", up.UpscaleRequest, dict(scale=5.0), "scale"),
    (up_grpc.UpscaleServiceStub, "Upscale", up.UpscaleRequest, dict(scale=0.5), "scale"),
    (up_grpc.UpscaleServiceStub, "Upscale", up.UpscaleRequest, dict(tile=16), "tile"),
    (up_grpc.UpscaleServiceStub, "Upscale", up.UpscaleRequest, dict(tile=4096), "tile"),
    (up_grpc.UpscaleServiceStub, "Upscale", up.UpscaleRequest, dict(tile=64, overlap=17), "overlap"),
    (up_grpc.UpscaleServiceStub, "Upscale", up.UpscaleRequest, dict(overlap=-1), "overlap"),
    (up_grpc.UpscaleServiceStub, "Upscale", up.UpscaleRequest, dict(upscaler=9), "upscaler"),
    (seg_grpc.SegmentServiceStub, "Segment", seg.SegmentRequest, dict(text=""), "text"),
    (seg_grpc.SegmentServiceStub, "Segment", seg.SegmentRequest, dict(text="sky", threshold=1.5), "threshold"),
    (seg_grpc.SegmentServiceStub, "Segment", seg.SegmentRequest, dict(text="sky", dilate=300), "dilate"),
    (seg_grpc.SegmentServiceStub, "Segment", seg.SegmentRequest, dict(text="sky", feather=-1), "feather"),
    (det_grpc.DetectServiceStub, "Detect", det.DetectRequest, dict(threshold=-0.1), "threshold"),
    (det_grpc.DetectServiceStub, "Ground", det.GroundRequest, dict(), "queries"),
    (det_grpc.DetectServiceStub, "Ground", det.GroundRequest, dict(queries=["dragon", " "]), "queries[1]"),
    (det_grpc.DetectServiceStub, "Ground", det.GroundRequest, dict(queries=["x"], threshold=2.0), "threshold"),
    (cap_grpc.CaptionServiceStub, "Caption", cap.CaptionRequest, dict(depth=7), "depth"),
    (cap_grpc.CaptionServiceStub, "Caption", cap.CaptionRequest, dict(max_tokens=600), "max_tokens"),
    (cap_grpc.CaptionServiceStub, "Analyze", cap.AnalyzeRequest, dict(depth=3), "depth"),
    (cap_grpc.CaptionServiceStub, "Analyze", cap.AnalyzeRequest, dict(threshold=1.01), "threshold"),
]


@pytest.mark.parametrize("stub_cls, rpc, request_cls, fields, field", BAD, ids=[f"{b[1]}-{b[4]}-{i}" for i, b in
                                                                               enumerate(BAD)])
async def test_bad_input_names_the_field(server, tiny_image_bytes, stub_cls, rpc, request_cls, fields, field):
    stub = stub_cls(server.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(getattr(stub, rpc)(request_cls(image=ref(tiny_image_bytes), **fields)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value), field_violations(err.value)


async def test_bad_expand_and_missing_image_and_pixel_limit(server_factory, tiny_image_bytes):
    handle = await server_factory(max_image_pixels=W * H)
    prompt = prm_grpc.PromptServiceStub(handle.channel)
    for fields, field in ((dict(prompt="  "), "prompt"), (dict(prompt="x" * 2001), "prompt"),
                          (dict(prompt="a", max_tokens=513), "max_tokens")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(prompt.Expand(prm.ExpandRequest(**fields)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in field_violations(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(cap_grpc.CaptionServiceStub(handle.channel).Caption(cap.CaptionRequest()))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image" in field_violations(err.value)
    upscale = up_grpc.UpscaleServiceStub(handle.channel)
    # At the limit the input is fine, but a 4x upscale of it would be 16 times over.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(upscale.Upscale(up.UpscaleRequest(image=ref(tiny_image_bytes))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image" in field_violations(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(det_grpc.DetectServiceStub(handle.channel).Detect(det.DetectRequest(
            image=ref(png_bytes((W + 1, H))))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The server keeps serving.
    events = await collect(upscale.Upscale(up.UpscaleRequest(image=ref(tiny_image_bytes), scale=1.0,
                                                             upscaler=image_pb2.UPSCALER_LANCZOS)))
    succeeded(events)


async def test_missing_models_fail_fast_with_failed_precondition(server_factory, tmp_path, tiny_image_bytes):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    handle = await server_factory(profile="quality", models={
        "birefnet-general": {"path": str(empty)}, "realesrgan-x4plus": {"path": str(tmp_path / "absent")}})
    events = await collect(bg_grpc.BackgroundServiceStub(handle.channel).RemoveBackground(
        bg.RemoveBackgroundRequest(image=ref(tiny_image_bytes))))
    job = events[-1].finished.job
    assert job.state == job_pb2.JOB_STATE_FAILED
    assert job.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "birefnet-general.onnx" in job.error.message and str(empty) in job.error.message
    assert (job.end_time.ToDatetime() - job.start_time.ToDatetime()).total_seconds() < 10
    events = await collect(up_grpc.UpscaleServiceStub(handle.channel).Upscale(
        up.UpscaleRequest(image=ref(tiny_image_bytes))))
    job = events[-1].finished.job
    assert job.state == job_pb2.JOB_STATE_FAILED and job.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "realesrgan-x4plus" in job.error.message


async def test_error_reason_is_invalid_argument(server):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(seg_grpc.SegmentServiceStub(server.channel).Segment(seg.SegmentRequest(text="sky")))
    assert error_reason(err.value) == "INVALID_ARGUMENT"
