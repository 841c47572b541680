"""RemoveBackground: BiRefNet-general through rembg; an RGBA cutout, optionally the mask too."""

from __future__ import annotations

from typing import Any

from paletta.v1 import background_pb2
from paletta_server.capabilities import common
from paletta_server.capabilities._vision import inference, prepare_image
from paletta_server.capabilities.base import Capability, PrepareContext, RunContext
from paletta_server.models.profiles import Profile

MODEL = "birefnet-general"


def prepare(request: background_pb2.RemoveBackgroundRequest, ctx: PrepareContext) -> Any:
    v = common.Violations()
    prepare_image(v, ctx, request.image)
    v.raise_if_any()
    return request


def models(request: Any, profile: Profile) -> list[str]:
    return [MODEL]


def run(request: background_pb2.RemoveBackgroundRequest, ctx: RunContext) -> None:
    from paletta_server.engines import background

    remover = ctx.model(MODEL)
    image = ctx.open_image(request.image.asset)
    cutout, mask = inference(ctx, lambda: background.remove_background(remover, image))
    parameters = {"model": MODEL, "return_mask": request.return_mask}
    ctx.emit_output(cutout, parameters={**parameters, "output": "cutout"})
    if request.return_mask:
        ctx.emit_output(mask, parameters={**parameters, "output": "mask"})


CAPABILITY = Capability("remove_background", background_pb2.RemoveBackgroundRequest, prepare, models, run,
                        cutout="makes",
                        model_keys=(MODEL,), chains={"image": "image"})
