"""Identity: text to image keeping a photo's face, PuLID-FLUX v0.9.1 on FLUX.1-dev.

The job finds the faces of ``face`` (InsightFace antelopev2), takes the largest (or the one
``face_index`` names; faces are ordered by box area), aligns and parses it (the crop, with its
background whitened, is stored as an asset and named in every output), encodes it into
identity tokens (ArcFace + EVA02-CLIP → IDFormer) and generates with them injected into
FLUX.1-dev (engines/pulid.py). Both face errors are only knowable on the device: no face fails
the job with FAILED_PRECONDITION / NO_FACE, a ``face_index`` past the faces found with
INVALID_ARGUMENT on ``face_index``.

In a pipeline the step makes the current image; ``face`` is never chained: the identity
reference is a photo of a person, not the picture the pipeline is working on, so taking the
previous step's output would silently give the result someone else's face.
"""

from __future__ import annotations

from typing import Any

from paletta.v1 import identity_pb2 as pb
from paletta.v1 import result_pb2
from paletta_server.capabilities import common, diffusion_io
from paletta_server.capabilities.base import Capability, PrepareContext, RunContext
from paletta_server.errors import FailedPrecondition, FieldViolation, InvalidArgument
from paletta_server.models.profiles import Profile

MODEL = "flux-dev-pipeline"
PULID = "pulid-flux"
FACES = "antelopev2"
EVA = "eva02-clip-l-336"
PARSING = "facexlib-parsing"
DEFAULT_EDGE = 1024
DEFAULT_STEPS = 20  # PuLID-FLUX's default
DEFAULT_GUIDANCE = 4.0  # PuLID-FLUX's default distilled guidance
DEFAULT_STRENGTH = 1.0


def default_steps(profile: Profile) -> int:
    return profile.accelerated_steps if profile.acceleration_lora and profile.accelerated_steps else DEFAULT_STEPS


def prepare(request: pb.IdentityServiceGenerateRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    diffusion_io.input_image(v, ctx, request.face, "face")
    common.check_prompt(v, request.prompt)
    common.default_size(v, request, DEFAULT_EDGE, ctx.profile.max_generate_edge)
    common.default_steps(v, request, default_steps(ctx.profile))
    common.default_variants(v, request)
    common.default_range(v, request, "guidance", DEFAULT_GUIDANCE, 0.0, 20.0)
    common.default_range(v, request, "id_strength", DEFAULT_STRENGTH, 0.0, 2.0)
    if request.HasField("start_step") and 1 <= request.steps <= 100:
        common.check_range(v, request.start_step, 0, request.steps - 1, "start_step")
    if request.HasField("face_index") and request.face_index < 0:
        v.add("face_index", f"must be >= 0 (0 is the largest face), got {request.face_index}")
    given_true_cfg = request.HasField("true_cfg")
    common.default_range(v, request, "true_cfg", 1.0, 1.0, 10.0)
    if request.HasField("negative_prompt"):
        if not (given_true_cfg and request.true_cfg > 1.0):
            v.add("negative_prompt", "is only used with true CFG: set true_cfg > 1 or leave it unset")
        else:
            common.check_prompt(v, request.negative_prompt, "negative_prompt", required=False)
    common.check_styles(v, ctx, request.styles, allowed=True, mode="identity")
    v.raise_if_any()
    common.fill(request, start_step=0, face_index=0)
    common.resolve_seed(request)
    return request


def models(request: pb.IdentityServiceGenerateRequest, profile: Profile) -> list[str]:
    keys = [MODEL, PULID, FACES, EVA, PARSING]
    return keys + ([profile.acceleration_lora] if profile.acceleration_lora else [])


def _chosen_face(faces: list[Any], request: pb.IdentityServiceGenerateRequest) -> tuple[int, Any]:
    if not faces:
        raise FailedPrecondition(
            "no face was found in the face image; use a photo where one face is clearly visible",
            reason="NO_FACE", violations=[FieldViolation("face", "no face found")])
    index = common.given(request, "face_index", 0)
    if index >= len(faces):
        raise InvalidArgument(FieldViolation(
            "face_index", f"must be in [0, {len(faces) - 1}]: {len(faces)} face(s) found, got {index}"))
    return index, faces[index]


def run(request: pb.IdentityServiceGenerateRequest, ctx: RunContext) -> None:
    from paletta_server.engines import faces as face_engine
    from paletta_server.engines import pulid
    from paletta_server.engines import styles as style_engine

    photo = ctx.open_image(request.face.asset).convert("RGB")
    found = face_engine.detect_faces(ctx.model(FACES), photo)
    index, face = _chosen_face(found, request)
    features = face_engine.face_features_image(ctx.model(PARSING), face_engine.align_face(photo, face.landmarks))
    crop = ctx.assets.put_image(face_engine.to_pil(features), {
        "capability": "identity", "job": ctx.job_name, "face": request.face.asset, "face_index": index})
    modules = ctx.model(PULID)
    identity = pulid.identity_tokens(modules, ctx.model(EVA), features, face.embedding)
    ctx.check_cancelled()

    acceleration = common.acceleration_lora(ctx)  # first: in the pipeline's memory plan
    pipe = ctx.model(MODEL)
    style_engine.ensure_acceleration(pipe, acceleration)
    strength = common.given(request, "id_strength", DEFAULT_STRENGTH)
    start_step = common.given(request, "start_step", 0)
    guidance = common.given(request, "guidance", DEFAULT_GUIDANCE)
    true_cfg = common.given(request, "true_cfg", 1.0)
    negative = request.negative_prompt if request.HasField("negative_prompt") else pulid.DEFAULT_NEGATIVE_PROMPT
    result = result_pb2.FaceIdentity(
        box=result_pb2.Box(x_min=face.box[0], y_min=face.box[1], x_max=face.box[2], y_max=face.box[3]),
        score=face.score, face_index=index, faces_found=len(found), face_crop=crop.name)
    with common.diffusion_extras(pipe, request, ctx) as (prompt, extra, applied):
        for i in range(request.variants):
            seed = request.seed + i
            image = pulid.generate(
                pipe, ctx, modules=modules, identity=identity, strength=strength, start_step=start_step,
                prompt=prompt, width=request.width, height=request.height, steps=request.steps, seed=seed,
                guidance=guidance, true_cfg=true_cfg, negative_prompt=negative,
                preview_every=ctx.config.preview_every, **extra)
            ctx.emit_output(image, seed=seed, result=result, parameters={
                "model": MODEL, "identity_model": PULID, "prompt": request.prompt, "effective_prompt": prompt,
                "face": request.face.asset, "face_crop": crop.name, "face_index": index, "faces_found": len(found),
                "face_box": [round(x, 2) for x in face.box], "face_score": round(face.score, 4),
                "id_strength": round(strength, 4), "start_step": start_step, "guidance": guidance,
                "true_cfg": round(true_cfg, 4), **({"negative_prompt": negative} if true_cfg > 1.0 else {}),
                "width": request.width, "height": request.height, "steps": request.steps, "seed": seed,
                "variant": i, "profile": ctx.profile.name, **applied,
            })


CAPABILITY = Capability("identity", pb.IdentityServiceGenerateRequest, prepare, models, run,
                        model_keys=(MODEL, PULID, FACES, EVA, PARSING, "flux-dev", "hyper-sd"),
                        result_type=result_pb2.FaceIdentity, makes="image")
