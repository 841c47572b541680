"""The capability calls, written once for both clients.

Each method builds its request, lists the image arguments still to resolve (uploaded through
AssetService by the client, then passed as ``ImageRef{asset}``) and hands both to ``_start``,
which the sync client implements by returning a :class:`~paletta.JobHandle` and the async one
by returning an awaitable :class:`~paletta.AsyncJobHandle`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from paletta import _common as c
from paletta import pipeline as pipeline_script
from paletta._common import ImageInput, StylesInput
from paletta.v1 import (
    background_service_pb2,
    caption_service_pb2,
    control_service_pb2,
    detect_service_pb2,
    edit_service_pb2,
    generate_service_pb2,
    inpaint_service_pb2,
    pipeline_service_pb2,
    prompt_service_pb2,
    qwen_edit_service_pb2,
    segment_service_pb2,
    upscale_service_pb2,
)

H = TypeVar("H")


@dataclass(frozen=True)
class ImageSlot:
    """An ImageRef field of a request still to fill: ``getattr(parent, field)``."""

    parent: Message
    field: str
    value: ImageInput


def _image_prompt(request: Any, image: ImageInput | None, weight: float | None) -> list[ImageSlot]:
    if image is None:
        if weight is not None:
            raise ValueError("image_prompt_weight needs an image_prompt")
        return []
    if weight is not None:
        request.image_prompt.weight = weight
    return [ImageSlot(request.image_prompt, "image", image)]


class Capabilities(Generic[H]):
    """Typed capability calls; ``H`` is what a call returns (a job handle or an awaitable of one)."""

    def _start(self, service: str, method: str, request: Message, images: list[ImageSlot]) -> H:
        raise NotImplementedError

    def generate(
        self,
        prompt: str,
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        seed: int | None = None,
        variants: int | None = None,
        styles: StylesInput = None,
        image_prompt: ImageInput | None = None,
        image_prompt_weight: float | None = None,
        guidance: float | None = None,
        request_id: str | None = None,
        priority: int | str | None = None,
        cancel_on_disconnect: bool = False,
    ) -> H:
        """Text to image with FLUX.1-schnell; ``variants`` N use seeds seed, seed+1, ….

        None (the default) leaves width, height, steps and variants to the server; 0 is refused. ``styles`` stacks style
        LoRAs ("tarot", "tarot:0.8", ("tarot", 0.8) or {"tarot": 0.8}); ``image_prompt`` is an
        IP-Adapter reference image.

        Example::

            job = client.generate("a knight", width=512, height=512, seed=7, variants=2)
            for i, image in enumerate(job.images()):
                image.save(f"knight-{i}.png")
        """
        request = generate_service_pb2.GenerateRequest(
            prompt=prompt,
            styles=c.styles(styles),
            **c.optional_fields(
                width=width, height=height, steps=steps, variants=variants, seed=seed, guidance=guidance
            ),
            **c.common_fields(request_id, priority, cancel_on_disconnect),
        )
        images = _image_prompt(request, image_prompt, image_prompt_weight)
        return self._start("GenerateService", "Generate", request, images)

    def edit(
        self,
        image: ImageInput,
        prompt: str,
        *,
        guidance: float | None = None,
        steps: int | None = None,
        seed: int | None = None,
        variants: int | None = None,
        styles: StylesInput = None,
        image_prompt: ImageInput | None = None,
        image_prompt_weight: float | None = None,
        upscaler: int | str | None = None,
        request_id: str | None = None,
        priority: int | str | None = None,
        cancel_on_disconnect: bool = False,
    ) -> H:
        """Edit an image from an instruction with FLUX.1-Kontext.

        Example::

            photo = client.edit("street.jpg", "make it golden hour").images().__next__()
        """
        request = edit_service_pb2.EditRequest(
            prompt=prompt,
            styles=c.styles(styles),
            upscaler=c.upscaler(upscaler),
            **c.optional_fields(steps=steps, variants=variants, seed=seed, guidance=guidance),
            **c.common_fields(request_id, priority, cancel_on_disconnect),
        )
        images = [
            ImageSlot(request, "image", image),
            *_image_prompt(request, image_prompt, image_prompt_weight),
        ]
        return self._start("EditService", "Edit", request, images)

    def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput,
        prompt: str,
        *,
        feather: int = 0,
        guidance: float | None = None,
        steps: int | None = None,
        seed: int | None = None,
        variants: int | None = None,
        upscaler: int | str | None = None,
        request_id: str | None = None,
        priority: int | str | None = None,
        cancel_on_disconnect: bool = False,
    ) -> H:
        """Regenerate the white part of ``mask`` with FLUX.1-Fill (a segment() output works as mask).

        Example::

            mask = client.segment("portrait.png", "her coat").wait().outputs[0].asset
            job = client.inpaint("portrait.png", mask, "a red velvet coat", feather=8)
        """
        request = inpaint_service_pb2.InpaintRequest(
            prompt=prompt,
            feather=feather,
            upscaler=c.upscaler(upscaler),
            **c.optional_fields(steps=steps, variants=variants, seed=seed, guidance=guidance),
            **c.common_fields(request_id, priority, cancel_on_disconnect),
        )
        images = [ImageSlot(request, "image", image), ImageSlot(request, "mask", mask)]
        return self._start("InpaintService", "Inpaint", request, images)

    def outpaint(
        self,
        image: ImageInput,
        prompt: str = "",
        *,
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        feather: int = 0,
        guidance: float | None = None,
        steps: int | None = None,
        seed: int | None = None,
        variants: int | None = None,
        upscaler: int | str | None = None,
        request_id: str | None = None,
        priority: int | str | None = None,
        cancel_on_disconnect: bool = False,
    ) -> H:
        """Extend the canvas by the given pixels per side and fill the new area with FLUX.1-Fill.

        Example::

            wide = client.outpaint("room.png", "more of the room", left=256, right=256)
        """
        request = inpaint_service_pb2.OutpaintRequest(
            prompt=prompt,
            left=left,
            right=right,
            top=top,
            bottom=bottom,
            feather=feather,
            upscaler=c.upscaler(upscaler),
            **c.optional_fields(steps=steps, variants=variants, seed=seed, guidance=guidance),
            **c.common_fields(request_id, priority, cancel_on_disconnect),
        )
        return self._start("InpaintService", "Outpaint", request, [ImageSlot(request, "image", image)])

    def qwen_edit(
        self,
        image: ImageInput,
        prompt: str,
        *,
        negative_prompt: str = "",
        guidance: float | None = None,
        steps: int | None = None,
        seed: int | None = None,
        variants: int | None = None,
        upscaler: int | str | None = None,
        request_id: str | None = None,
        priority: int | str | None = None,
        cancel_on_disconnect: bool = False,
    ) -> H:
        """Edit an image from an instruction with Qwen-Image-Edit.

        Example::

            job = client.qwen_edit("cat.png", "put a hat on the cat", negative_prompt="blurry")
        """
        request = qwen_edit_service_pb2.QwenEditServiceEditRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            upscaler=c.upscaler(upscaler),
            **c.optional_fields(steps=steps, variants=variants, seed=seed, guidance=guidance),
            **c.common_fields(request_id, priority, cancel_on_disconnect),
        )
        return self._start("QwenEditService", "Edit", request, [ImageSlot(request, "image", image)])

    def control(
        self,
        control_image: ImageInput,
        prompt: str,
        control_type: int | str,
        *,
        control_scale: float | None = None,
        preprocess: int | str | None = None,
        width: int = 0,
        height: int = 0,
        guidance: float | None = None,
        image_prompt: ImageInput | None = None,
        image_prompt_weight: float | None = None,
        steps: int | None = None,
        seed: int | None = None,
        variants: int | None = None,
        upscaler: int | str | None = None,
        request_id: str | None = None,
        priority: int | str | None = None,
        cancel_on_disconnect: bool = False,
    ) -> H:
        """Generate following a conditioning map with ControlNet Union-Pro.

        ``control_type`` is "canny", "depth" or "pose"; ``preprocess="canny"`` makes the edge map
        on the server from a plain photo.

        Example::

            job = client.control("photo.jpg", "a watercolor city", "canny", preprocess="canny")
        """
        request = control_service_pb2.ControlRequest(
            prompt=prompt,
            control_type=c.control_type(control_type),
            preprocess=c.preprocess(preprocess),
            width=width,
            height=height,
            upscaler=c.upscaler(upscaler),
            **c.optional_fields(
                steps=steps, variants=variants, seed=seed, guidance=guidance, control_scale=control_scale
            ),
            **c.common_fields(request_id, priority, cancel_on_disconnect),
        )
        images = [
            ImageSlot(request, "control_image", control_image),
            *_image_prompt(request, image_prompt, image_prompt_weight),
        ]
        return self._start("ControlService", "Control", request, images)

    def upscale(
        self,
        image: ImageInput,
        *,
        upscaler: int | str | None = None,
        scale: float | None = None,
        tile: int = 0,
        overlap: int | None = None,
        request_id: str | None = None,
        priority: int | str | None = None,
        cancel_on_disconnect: bool = False,
    ) -> H:
        """Enlarge an image: ``upscaler`` "realesrgan" (default, tiled) or "lanczos".

        Example::

            big = client.upscale("small.png", scale=4).images().__next__()
        """
        request = upscale_service_pb2.UpscaleRequest(
            upscaler=c.upscaler(upscaler),
            tile=tile,
            **c.optional_fields(scale=scale, overlap=overlap),
            **c.common_fields(request_id, priority, cancel_on_disconnect),
        )
        return self._start("UpscaleService", "Upscale", request, [ImageSlot(request, "image", image)])

    def remove_background(
        self,
        image: ImageInput,
        *,
        return_mask: bool = False,
        request_id: str | None = None,
        priority: int | str | None = None,
        cancel_on_disconnect: bool = False,
    ) -> H:
        """Cut the subject out with BiRefNet: an RGBA PNG (and the mask as a second output).

        Example::

            cutout = client.remove_background("product.jpg").images().__next__()
        """
        request = background_service_pb2.RemoveBackgroundRequest(
            return_mask=return_mask,
            **c.common_fields(request_id, priority, cancel_on_disconnect),
        )
        return self._start("BackgroundService", "RemoveBackground", request, [ImageSlot(request, "image", image)])

    def segment(
        self,
        image: ImageInput,
        text: str,
        *,
        threshold: float | None = None,
        dilate: int = 0,
        feather: int = 0,
        request_id: str | None = None,
        priority: int | str | None = None,
        cancel_on_disconnect: bool = False,
    ) -> H:
        """Make a mask of what ``text`` describes with CLIPSeg; the output asset feeds inpaint().

        Example::

            job = client.segment("landscape.png", "the sky", dilate=4)
            coverage = job.results()[0].coverage
        """
        request = segment_service_pb2.SegmentRequest(
            text=text,
            dilate=dilate,
            feather=feather,
            **c.optional_fields(threshold=threshold),
            **c.common_fields(request_id, priority, cancel_on_disconnect),
        )
        return self._start("SegmentService", "Segment", request, [ImageSlot(request, "image", image)])

    def detect(
        self,
        image: ImageInput,
        *,
        threshold: float | None = None,
        request_id: str | None = None,
        priority: int | str | None = None,
        cancel_on_disconnect: bool = False,
    ) -> H:
        """Find COCO objects with DETR; the result is a Detections message.

        Example::

            for d in client.detect("street.jpg").results()[0].detections:
                print(d.label, d.score, d.box.x_min, d.box.y_min)
        """
        request = detect_service_pb2.DetectRequest(
            **c.optional_fields(threshold=threshold),
            **c.common_fields(request_id, priority, cancel_on_disconnect),
        )
        return self._start("DetectService", "Detect", request, [ImageSlot(request, "image", image)])

    def ground(
        self,
        image: ImageInput,
        queries: str | Sequence[str],
        *,
        threshold: float | None = None,
        request_id: str | None = None,
        priority: int | str | None = None,
        cancel_on_disconnect: bool = False,
    ) -> H:
        """Find what text queries describe with OWLv2; the result is a Detections message.

        Example::

            boxes = client.ground("cave.png", ["the dragon"]).results()[0].detections
        """
        request = detect_service_pb2.GroundRequest(
            queries=[queries] if isinstance(queries, str) else list(queries),
            **c.optional_fields(threshold=threshold),
            **c.common_fields(request_id, priority, cancel_on_disconnect),
        )
        return self._start("DetectService", "Ground", request, [ImageSlot(request, "image", image)])

    def caption(
        self,
        image: ImageInput,
        *,
        depth: int | str | None = None,
        max_tokens: int = 0,
        request_id: str | None = None,
        priority: int | str | None = None,
        cancel_on_disconnect: bool = False,
    ) -> H:
        """Describe an image: ``depth`` "fast" (BLIP-large) or "deep" (BLIP-2); result: Caption.

        Example::

            print(client.caption("photo.jpg", depth="deep").results()[0].text)
        """
        request = caption_service_pb2.CaptionRequest(
            depth=c.caption_depth(depth),
            max_tokens=max_tokens,
            **c.common_fields(request_id, priority, cancel_on_disconnect),
        )
        return self._start("CaptionService", "Caption", request, [ImageSlot(request, "image", image)])

    def analyze(
        self,
        image: ImageInput,
        *,
        depth: int | str | None = None,
        threshold: float | None = None,
        request_id: str | None = None,
        priority: int | str | None = None,
        cancel_on_disconnect: bool = False,
    ) -> H:
        """Caption plus DETR object labels in one job; result: Caption with ``objects``.

        Example::

            caption = client.analyze("photo.jpg").results()[0]
            print(caption.text, list(caption.objects))
        """
        request = caption_service_pb2.AnalyzeRequest(
            depth=c.caption_depth(depth),
            **c.optional_fields(threshold=threshold),
            **c.common_fields(request_id, priority, cancel_on_disconnect),
        )
        return self._start("CaptionService", "Analyze", request, [ImageSlot(request, "image", image)])

    def expand(
        self,
        prompt: str,
        *,
        seed: int | None = None,
        max_tokens: int = 0,
        request_id: str | None = None,
        priority: int | str | None = None,
        cancel_on_disconnect: bool = False,
    ) -> H:
        """Rewrite a short prompt as a verbose FLUX-style description; result: PromptExpansion.

        Example::

            print(client.expand("a cozy cabin", seed=1).results()[0].expanded)
        """
        request = prompt_service_pb2.ExpandRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            **c.optional_fields(seed=seed),
            **c.common_fields(request_id, priority, cancel_on_disconnect),
        )
        return self._start("PromptService", "Expand", request, [])

    def pipeline(
        self,
        steps: str | Sequence[pipeline_service_pb2.PipelineStep],
        *,
        image: ImageInput | None = None,
        request_id: str | None = None,
        priority: int | str | None = None,
        cancel_on_disconnect: bool = False,
    ) -> H:
        """Run a chain of steps as one job, each on the previous step's output.

        ``steps`` is a pipeline script (see :mod:`paletta.pipeline`) or PipelineStep messages;
        ``image`` is the optional starting image. Every step's outputs come back in order.

        Example::

            job = client.pipeline('''
                [generate|tarot] knight in stormy mountain pass
                [auto_mask] the knight
                [inpaint] in obsidian cyborg armor with neon glow
            ''')
            final = list(job.images())[-1]
        """
        if isinstance(steps, str):
            steps = pipeline_script.parse(steps, has_image=image is not None)
        request = pipeline_service_pb2.RunPipelineRequest(
            steps=list(steps), **c.common_fields(request_id, priority, cancel_on_disconnect)
        )
        images = [ImageSlot(request, "image", image)] if image is not None else []
        return self._start("PipelineService", "RunPipeline", request, images)
