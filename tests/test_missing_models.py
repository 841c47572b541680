"""A model that is neither on disk nor downloadable fails its job fast with FAILED_PRECONDITION
naming the model and how to provide it, for every capability; the server keeps serving."""

import time

import grpc
import pytest
from google.rpc import error_details_pb2

from paletta.v1 import (
    background_pb2,
    caption_pb2,
    control_pb2,
    detect_pb2,
    edit_pb2,
    generate_pb2,
    identity_pb2,
    image_pb2,
    inpaint_pb2,
    job_pb2,
    prompt_pb2,
    qwen_edit_pb2,
    segment_pb2,
    system_service_pb2,
    system_service_pb2_grpc,
    upscale_pb2,
)
from paletta.v1 import generate_service_pb2_grpc as gen_grpc
from paletta_server.api.capabilities import capability_rpcs
from paletta_server.capabilities import discover
from tests.helpers import collect, png_bytes, upload


def requests(image: image_pb2.ImageRef, mask: image_pb2.ImageRef) -> dict[str, tuple[object, str]]:
    """capability → (a valid request, the model it needs)."""
    return {
        "generate": (generate_pb2.GenerateRequest(prompt="a", width=64, height=64), "flux-schnell"),
        "edit": (edit_pb2.EditRequest(image=image, prompt="b"), "flux-kontext"),
        "inpaint": (inpaint_pb2.InpaintRequest(image=image, mask=mask, prompt="c"), "flux-fill"),
        "outpaint": (inpaint_pb2.OutpaintRequest(image=image, left=16), "flux-fill"),
        "qwen_edit": (qwen_edit_pb2.QwenEditServiceEditRequest(image=image, prompt="d"), "qwen-image-edit"),
        "control": (control_pb2.ControlRequest(control_image=image, prompt="e",
                                                       control_type=control_pb2.CONTROL_TYPE_CANNY),
                    "flux-controlnet-union"),
        "upscale": (upscale_pb2.UpscaleRequest(image=image), "realesrgan-x4plus"),
        "remove_background": (background_pb2.RemoveBackgroundRequest(image=image), "birefnet-general"),
        "segment": (segment_pb2.SegmentRequest(image=image, text="sky"), "clipseg"),
        "detect": (detect_pb2.DetectRequest(image=image), "detr-resnet-50"),
        "ground": (detect_pb2.GroundRequest(image=image, queries=["a dragon"]), "owlv2"),
        "caption": (caption_pb2.CaptionRequest(image=image), "blip-large"),
        "analyze": (caption_pb2.AnalyzeRequest(image=image), "blip-large"),
        "expand": (prompt_pb2.ExpandRequest(prompt="knight"), "qwen2.5-1.5b-instruct"),
        # The face is found before FLUX.1-dev loads, so the face models are the first missing.
        "identity": (identity_pb2.IdentityServiceGenerateRequest(face=image, prompt="f"), "antelopev2"),
    }


# Derived from the capability declarations: a new capability without an example request fails below.
RPC = {cap.name: (module, service, rpc) for (module, service, rpc), cap in capability_rpcs(discover()).items()}


def test_every_capability_has_an_rpc_and_an_example_here():
    assert set(RPC) == set(discover())
    example = requests(image_pb2.ImageRef(asset="a"), image_pb2.ImageRef(asset="m"))
    assert set(example) == set(RPC) - {"pipeline"}


def reason(status) -> str:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


@pytest.fixture
async def no_weights(server_factory, tmp_path, monkeypatch):
    """A `quality` server (real model sources) on a machine with no weights and no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # not this machine's torch cache (Real-ESRGAN's)
    handle = await server_factory(profile="quality")
    image = image_pb2.ImageRef(asset=(await upload(handle.channel, png_bytes((64, 64)))).name)
    mask = image_pb2.ImageRef(asset=(await upload(handle.channel, png_bytes((64, 64), (255, 255, 255)))).name)
    return handle, requests(image, mask)


@pytest.mark.parametrize("capability", sorted(set(RPC) - {"pipeline"}))
async def test_missing_model_fails_fast_for_every_capability(no_weights, capability):
    import importlib

    handle, reqs = no_weights
    request, model = reqs[capability]
    module, service, rpc = RPC[capability]
    stub = getattr(importlib.import_module(module), f"{service}Stub")(handle.channel)
    start = time.monotonic()
    events = await collect(getattr(stub, rpc)(request))
    job = events[-1].finished.job
    assert job.state == job_pb2.JOB_STATE_FAILED
    assert job.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert reason(job.error) == "MODEL_UNAVAILABLE"
    assert model in job.error.message and "PALETTA_MODEL_" in job.error.message
    assert time.monotonic() - start < 30


async def test_without_offline_mode_an_unreachable_hub_still_fails_fast(server_factory, monkeypatch):
    import huggingface_hub.constants

    # The fixtures set HF_HUB_OFFLINE; here the hub is really tried (and unreachable from this machine,
    # or pointed at a closed local port so the test means the same anywhere).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    handle = await server_factory(profile="quality")
    start = time.monotonic()
    events = await collect(gen_grpc.GenerateServiceStub(handle.channel).Generate(
        generate_pb2.GenerateRequest(prompt="a", width=64, height=64)))
    job = events[-1].finished.job
    assert job.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "flux-schnell" in job.error.message
    assert time.monotonic() - start < 30
    status = await system_service_pb2_grpc.SystemServiceStub(handle.channel).GetStatus(
        system_service_pb2.GetStatusRequest())
    assert status.profile == "quality" and not status.loaded_models
