"""Identity (PuLID-FLUX): tiny builds in the real formats loaded by the real loaders, the injection
mechanics on the FLUX.1-dev pipeline, face errors, the face crop, residency, and the gRPC job.

Random weights say nothing about whether a face is *recognisable*; these tests check the
mechanics that would be wrong if the code were: where the identity enters, when, how strongly,
that it leaves no trace, and that the right face is used.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

import paletta
from paletta.v1 import generate_pb2 as gen
from paletta.v1 import generate_service_pb2_grpc as gen_grpc
from paletta.v1 import identity_pb2 as id_pb
from paletta.v1 import identity_service_pb2_grpc as id_grpc
from paletta.v1 import image_pb2, job_pb2, job_spec_pb2, pipeline_service_pb2_grpc, upscale_pb2
from paletta.v1 import system_service_pb2 as sys_pb
from paletta.v1 import system_service_pb2_grpc as sys_grpc
from paletta_server.errors import ModelUnavailable
from tests.helpers import collect, download_image, error_reason, face_photo, field_violations, kinds
from tests.test_diffusion_engines import Models, Sink

IDENTITY_KEYS = {"flux-dev-pipeline", "pulid-flux", "antelopev2", "eva02-clip-l-336", "facexlib-parsing"}
QUICK = dict(prompt="portrait of a knight", width=64, height=64, steps=2, seed=5)
DEV = dict(prompt="portrait of a knight", width=64, height=64, steps=4, seed=3, guidance=4.0)


def encode(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def distance(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


# -- engines on the tiny builds -------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    return Models(tmp_path_factory.mktemp("identity-models"))


@pytest.fixture(scope="module")
def tokens(models):
    """Identity tokens of the largest face of face_photo(1) and of face_photo(2)."""
    from paletta_server.engines import faces, pulid

    out = []
    for seed in (1, 2):
        photo = face_photo(seed)
        face = faces.detect_faces(models.model("antelopev2"), photo)[0]
        features = faces.face_features_image(models.model("facexlib-parsing"), faces.align_face(photo, face.landmarks))
        out.append(pulid.identity_tokens(models.model("pulid-flux"), models.model("eva02-clip-l-336"), features,
                                         face.embedding))
    return out


def identity_image(models, identity, strength=1.0, start_step=0, **overrides):
    from paletta_server.engines import pulid

    return pulid.generate(models.model("flux-dev-pipeline"), Sink(), modules=models.model("pulid-flux"),
                          identity=identity, strength=strength, start_step=start_step, **{**DEV, **overrides})


def plain_dev_image(models):
    from paletta_server.engines import flux

    return flux.text_to_image(models.model("flux-dev-pipeline"), Sink(), **DEV)


def test_tiny_builds_load_in_the_real_layouts(models):
    from diffusers import FluxPipeline

    from paletta_server.engines import pulid

    pipe = models.model("flux-dev-pipeline")
    assert isinstance(pipe, FluxPipeline) and pipe.transformer.config.guidance_embeds
    modules = models.model("pulid-flux")
    assert {k.split(".")[0] for k in modules.state_dict()} == {"pulid_encoder", "pulid_ca"}
    assert len(modules.pulid_ca) == len(pulid.injection_blocks(pipe.transformer)) == 2
    assert set(models.model("antelopev2").app.models) == {"detection", "recognition"}
    bundle = models.root / "antelopev2" / "models" / "antelopev2"  # insightface's <root>/models/<name>/
    assert sorted(p.name for p in bundle.iterdir()) == ["glintr100.onnx", "scrfd_10g_bnkps.onnx"]
    eva = models.model("eva02-clip-l-336")
    assert type(eva.model).__name__ == "Eva" and eva.image_size == (28, 28) and len(eva.model.blocks) == 21
    assert type(models.model("facexlib-parsing").model).__name__ == "BiSeNet"


def test_pickled_weights_are_refused(tmp_path, models):
    from paletta_server.engines import faces, pulid
    from paletta_server.models.types import ModelSource

    (tmp_path / "parsing_bisenet.pth").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelUnavailable, match="not safetensors"):
        faces.load_face_parser(ModelSource("facexlib-parsing", path=tmp_path / "parsing_bisenet.pth"), models.lc)
    (tmp_path / "pulid_flux_v0.9.1.pth").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelUnavailable, match="not safetensors"):
        pulid.load_pulid(ModelSource("pulid-flux", path=tmp_path / "pulid_flux_v0.9.1.pth"), models.lc)


def test_faces_are_found_largest_first_with_their_own_embeddings(models):
    from paletta_server.engines import faces

    found = faces.detect_faces(models.model("antelopev2"), face_photo(1))
    assert len(found) == 2
    big, small = found
    assert big.box[0] == pytest.approx(64, abs=2) and big.box[2] - big.box[0] == pytest.approx(128, abs=3)
    assert small.box[0] == pytest.approx(192, abs=2) and small.box[2] - small.box[0] == pytest.approx(64, abs=3)
    assert big.score > 0.9 and small.score > 0.9 and big.embedding.shape == (512,)
    assert not np.allclose(big.embedding, small.embedding)
    assert faces.detect_faces(models.model("antelopev2"), Image.new("RGB", (256, 256))) == []


def test_the_face_crop_is_aligned_and_its_background_whitened(models):
    from paletta_server.engines import faces

    photo = face_photo(1)
    face = faces.detect_faces(models.model("antelopev2"), photo)[0]
    aligned = faces.align_face(photo, face.landmarks)
    features = faces.face_features_image(models.model("facexlib-parsing"), aligned)
    crop = np.asarray(faces.to_pil(features), dtype=np.int16)
    assert aligned.size == (512, 512) and crop.shape == (512, 512, 3)
    assert (crop[..., 0] == crop[..., 1]).all() and (crop[..., 1] == crop[..., 2]).all()  # grayscale
    white = (crop == 255).all(axis=-1)
    assert 0.0 < white.mean() < 1.0  # some classes parsed away to white, some face kept


def test_zero_strength_is_bit_identical_to_flux_dev_and_the_hooks_leave_no_trace(models, tokens):
    pipe = models.model("flux-dev-pipeline")
    before = plain_dev_image(models)
    assert identity_image(models, tokens[0], strength=0.0).tobytes() == before.tobytes()
    with_identity = identity_image(models, tokens[0], strength=1.0)
    assert distance(with_identity, before) > 1.0
    modules = [pipe.transformer, *pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    assert plain_dev_image(models).tobytes() == before.tobytes()


def test_a_different_face_changes_the_output(models, tokens):
    first, second = tokens
    assert not np.allclose(first.tokens.numpy(), second.tokens.numpy())
    a = identity_image(models, first)
    assert identity_image(models, first).tobytes() == a.tobytes()  # deterministic per face and seed
    assert distance(identity_image(models, second), a) > 1.0


def test_a_later_start_step_stays_closer_to_the_baseline(models, tokens):
    baseline = plain_dev_image(models)
    distances = [distance(identity_image(models, tokens[0], start_step=s), baseline) for s in range(4)]
    assert distances == sorted(distances, reverse=True) and distances[-1] > 0.0
    # start_step 0 at strength 2 moves further than at strength 1
    assert distance(identity_image(models, tokens[0], strength=2.0), baseline) > distances[0]


def test_true_cfg_runs_a_negative_pass_with_the_neutral_identity(models, tokens):
    from paletta_server.engines import pulid

    calls = []
    transformer = models.model("flux-dev-pipeline").transformer
    handle = transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with_cfg = identity_image(models, tokens[0], true_cfg=3.0, negative_prompt=pulid.DEFAULT_NEGATIVE_PROMPT)
    finally:
        handle.remove()
    assert len(calls) == 2 * DEV["steps"]
    assert distance(with_cfg, identity_image(models, tokens[0])) > 1.0


def test_identity_under_model_cpu_offload_gives_the_same_image(models, tokens):
    """The memory plan may run FLUX.1-dev offloaded beside PuLID's resident modules: with the real
    accelerate hooks (the CPU standing in for the GPU) the identity image is the whole pipeline's."""
    from paletta_server.engines import pulid
    from paletta_server.engines.common import import_object
    from tests.test_diffusion_engines import SPEC

    pipe = import_object(SPEC["flux-dev-pipeline"].loader)(models.source("flux-dev-pipeline"), models.lc)

    def image():
        return pulid.generate(pipe, Sink(), modules=models.model("pulid-flux"), identity=tokens[0], strength=1.0,
                              start_step=0, **DEV)

    whole = image()
    pipe.enable_model_cpu_offload(device="cpu")
    assert image().tobytes() == whole.tobytes() and image().tobytes() == whole.tobytes()


@pytest.mark.parametrize(("device", "available", "expected"), [
    ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("cuda", ["AzureExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),  # plain wheel
    ("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
])
def test_face_models_ask_onnxruntime_for_cuda_only_where_it_has_it(monkeypatch, device, available, expected):
    import onnxruntime

    from paletta_server.engines import faces

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: available)
    assert faces.onnx_providers(device) == expected


def test_the_identity_follows_the_ca_modules_device_when_the_transformer_waits_elsewhere(models, tokens):
    """Under model CPU offload the transformer's weights wait on the CPU while its blocks compute on
    the GPU beside PuLID's CA modules: the identity must go where the CA modules are. Stood in here by
    a transformer whose own weights are on the meta device and whose blocks pass CPU tensors."""
    import torch

    from paletta_server.engines import pulid

    real = models.model("flux-dev-pipeline").transformer
    modules = models.model("pulid-flux")
    dim = modules.pulid_ca[0].to_q.in_features

    class Block(torch.nn.Module):
        def forward(self, encoder_hidden_states, hidden_states):
            return encoder_hidden_states, hidden_states

    class Waiting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(1, device="meta"))
            self.transformer_blocks = torch.nn.ModuleList(Block() for _ in real.transformer_blocks)
            self.single_transformer_blocks = torch.nn.ModuleList(Block() for _ in real.single_transformer_blocks)

        def forward(self, hidden_states):
            encoder = torch.zeros(1, 2, dim)
            for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
                encoder, hidden_states = block(encoder, hidden_states)
            return hidden_states

    transformer = Waiting()
    hidden = torch.randn(1, 4, dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), pulid.injected_identity(transformer, modules, tokens[0], 1.0, start_step=0):
        out = transformer(hidden)
    assert out.device.type == "cpu" and out.shape == hidden.shape
    assert (out - hidden).abs().mean() > 1e-3  # the CA modules added the identity


# -- the capability through a real server ---------------------------------------------------------
async def upload_face(server, photo: Image.Image) -> image_pb2.ImageRef:
    from tests.helpers import upload

    info = await upload(server.channel, encode(photo))
    return image_pb2.ImageRef(asset=info.name)


async def test_identity_job_end_to_end_with_typed_result_and_face_crop(server):
    stub = id_grpc.IdentityServiceStub(server.channel)
    face = await upload_face(server, face_photo(1))
    events = await collect(stub.Generate(id_pb.IdentityServiceGenerateRequest(face=face, variants=2, **QUICK)))
    job = events[-1].finished.job
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error.message
    assert job.capability == "identity" and job.spec.identity.face.asset == face.asset
    assert "progress" in kinds(events) and len(job.outputs) == 2
    assert [o.seed for o in job.outputs] == [5, 6]
    result = job.outputs[0].face_identity
    assert job.outputs[1].face_identity == result
    assert result.face_index == 0 and result.faces_found == 2 and result.score > 0.9
    assert result.box.x_max - result.box.x_min == pytest.approx(128, abs=3)
    params = json.loads(job.outputs[0].parameters)
    assert params["face_crop"] == result.face_crop and params["id_strength"] == 1.0 and params["steps"] == 2
    assert params["model"] == "flux-dev-pipeline" and params["guidance"] == 4.0
    crop = await download_image(server.channel, result.face_crop)
    assert crop.size == (512, 512)
    image = await download_image(server.channel, job.outputs[0].asset.name)
    assert image.size == (64, 64)


async def test_face_index_picks_another_face_and_past_the_faces_fails_the_job(server):
    stub = id_grpc.IdentityServiceStub(server.channel)
    face = await upload_face(server, face_photo(1))
    second = (await collect(stub.Generate(id_pb.IdentityServiceGenerateRequest(face=face, face_index=1,
                                                                              **QUICK))))[-1].finished.job
    assert second.state == job_pb2.JOB_STATE_SUCCEEDED, second.error.message
    box = second.outputs[0].face_identity.box
    assert (box.x_min, box.x_max - box.x_min) == (pytest.approx(192, abs=2), pytest.approx(64, abs=3))
    job = (await collect(stub.Generate(id_pb.IdentityServiceGenerateRequest(face=face, face_index=2,
                                                                           **QUICK))))[-1].finished.job
    assert job.state == job_pb2.JOB_STATE_FAILED and job.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "2 face(s) found" in field_violations(job.error)["face_index"]


async def test_a_photo_without_a_face_fails_with_no_face(server):
    stub = id_grpc.IdentityServiceStub(server.channel)
    face = await upload_face(server, Image.new("RGB", (128, 96), (40, 40, 40)))
    job = (await collect(stub.Generate(id_pb.IdentityServiceGenerateRequest(face=face, **QUICK))))[-1].finished.job
    assert job.state == job_pb2.JOB_STATE_FAILED
    assert job.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and error_reason(job.error) == "NO_FACE"
    assert not job.outputs


async def test_bad_requests_are_refused_at_once_naming_every_field(server):
    stub = id_grpc.IdentityServiceStub(server.channel)
    request = id_pb.IdentityServiceGenerateRequest(prompt="", id_strength=2.5, steps=4, start_step=4, face_index=-1,
                                                   true_cfg=0.5, negative_prompt="blurry", width=60)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.Generate(request))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(err.value)) == {"face", "prompt", "id_strength", "start_step", "face_index",
                                                "true_cfg", "negative_prompt", "width"}


async def test_identity_is_a_pipeline_step_that_makes_the_image(server):
    face = await upload_face(server, face_photo(1, small_face=False))
    request = job_spec_pb2.RunPipelineRequest(steps=[
        job_spec_pb2.JobSpec(identity=id_pb.IdentityServiceGenerateRequest(face=face, **QUICK)),
        job_spec_pb2.JobSpec(upscale=upscale_pb2.UpscaleRequest(scale=2.0))])
    job = (await collect(pipeline_service_pb2_grpc.PipelineServiceStub(server.channel).RunPipeline(request)))[-1]
    job = job.finished.job
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error.message
    assert [json.loads(o.parameters)["step_capability"] for o in job.outputs] == ["identity", "upscale"]
    assert job.outputs[0].face_identity.faces_found == 1
    assert (job.outputs[1].asset.width, job.outputs[1].asset.height) == (128, 128)
    # a step without a face is refused: the face is never chained
    bad = job_spec_pb2.RunPipelineRequest(steps=[job_spec_pb2.JobSpec(identity=id_pb.IdentityServiceGenerateRequest(
        **QUICK))])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(pipeline_service_pb2_grpc.PipelineServiceStub(server.channel).RunPipeline(bad))
    assert "steps[0].identity.face" in field_violations(err.value)


async def test_identity_models_are_resident_measured_evicted_and_reloaded(server_factory, tiny_models_dir):
    # First measure the tiny models on a roomy server, then size a budget that holds the identity
    # set or FLUX.1-schnell beside part of it, never both whole.
    roomy = await server_factory()
    face = await upload_face(roomy, face_photo(1))
    await collect(gen_grpc.GenerateServiceStub(roomy.channel).Generate(gen.GenerateRequest(**QUICK)))
    await collect(id_grpc.IdentityServiceStub(roomy.channel).Generate(
        id_pb.IdentityServiceGenerateRequest(face=face, **QUICK)))
    status = await sys_grpc.SystemServiceStub(roomy.channel).GetStatus(sys_pb.GetStatusRequest())
    sizes = {m.key: m.bytes for m in status.loaded_models}
    assert set(sizes) >= IDENTITY_KEYS and all(sizes[k] > 0 for k in IDENTITY_KEYS)
    identity_bytes = sum(sizes[k] for k in IDENTITY_KEYS)

    tight = await server_factory(cpu_memory_budget_bytes=identity_bytes + sizes["flux-schnell"] // 2)
    face = await upload_face(tight, face_photo(1))
    identity = id_grpc.IdentityServiceStub(tight.channel)
    generate = gen_grpc.GenerateServiceStub(tight.channel)
    request = id_pb.IdentityServiceGenerateRequest(face=face, **QUICK)
    first = (await collect(identity.Generate(request)))[-1].finished.job
    await collect(generate.Generate(gen.GenerateRequest(**QUICK)))
    events = await collect(identity.Generate(request))
    again = events[-1].finished.job
    assert again.state == job_pb2.JOB_STATE_SUCCEEDED, again.error.message
    assert any(e.progress.stage == "evicting" and e.progress.model == "flux-schnell" for e in events)
    counts = tight.app.residency.load_counts
    reloaded = {k for k in IDENTITY_KEYS if counts[k] == 2}
    assert reloaded and all(counts[k] in (1, 2) for k in IDENTITY_KEYS)
    assert any(e.progress.stage == "loading" and e.progress.model in reloaded for e in events)
    pixels = [(await download_image(tight.channel, j.outputs[0].asset.name)).tobytes() for j in (first, again)]
    assert pixels[0] == pixels[1]  # reloaded weights give the same image


async def test_sdk_identity_returns_images_and_the_face(server, tmp_path: Path):
    photo = tmp_path / "me.png"
    face_photo(2).save(photo)
    async with paletta.AsyncClient(server.address) as client:
        job = client.identity(str(photo), "a knight", width=64, height=64, steps=2, seed=1, id_strength=0.8)
        face = await job.result()
        image = await job.image()
    assert isinstance(face, paletta.FaceIdentity) and face.faces_found == 2 and face.face_index == 0
    assert face.box.width == pytest.approx(128, abs=3) and face.face_crop.startswith("assets/")
    assert image.size == (64, 64)
