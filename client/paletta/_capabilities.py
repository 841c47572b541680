"""The capability calls, written once for both clients.

Each method builds its request (with ``JobOptions``) as a :class:`~paletta._calls.JobCall` and
hands it to ``_submit``: the sync client returns a started :class:`~paletta.JobHandle`, the
async one an awaitable :class:`~paletta.AsyncJobHandle` that submits on first use. The class
is generic in the handle type per result type, so ``client.detect(...).result()`` is typed
``Detections`` in both clients.

Every optional argument defaults to None, which leaves the field to the server's default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, Never, TypeVar, cast

from google.protobuf.message import Message

from paletta import _common as c
from paletta import pipeline as pipeline_script
from paletta._calls import Dependency, ImageSlot, JobCall, job_options
from paletta._common import ImageInput, StylesInput
from paletta.results import Caption, Detections, FaceIdentity, PromptExpansion, Result, Segmentation
from paletta.v1 import (
    background_pb2,
    caption_pb2,
    control_pb2,
    detect_pb2,
    edit_pb2,
    generate_pb2,
    identity_pb2,
    inpaint_pb2,
    job_spec_pb2,
    prompt_pb2,
    qwen_edit_pb2,
    segment_pb2,
    upscale_pb2,
)

HImage = TypeVar("HImage")  # handle of a job whose outputs are images only
HSeg = TypeVar("HSeg")
HDet = TypeVar("HDet")
HCap = TypeVar("HCap")
HExp = TypeVar("HExp")
HAny = TypeVar("HAny")  # handle of a pipeline: any result type
HFace = TypeVar("HFace")  # handle of an identity job: images with a FaceIdentity result

Priority = int | str | None
"""A queue priority: "low", "normal", "high" (or the enum int); None = the capability's default."""


def _image_prompt(request: Any, image: ImageInput | None, weight: float | None) -> list[ImageSlot]:
    if image is None:
        if weight is not None:
            raise ValueError("image_prompt_weight needs an image_prompt")
        return []
    if weight is not None:
        request.image_prompt.weight = weight
    return [ImageSlot(request.image_prompt, "image", image)]


class Capabilities(Generic[HImage, HSeg, HDet, HCap, HExp, HAny, HFace]):
    """Typed capability calls; each type parameter is the handle a call returns, per result type."""

    def _submit(self, call: JobCall[Any]) -> object:
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
        priority: Priority = None,
        cancel_on_disconnect: bool = False,
    ) -> HImage:
        """Text to image with FLUX.1-schnell; ``variants`` N use seeds seed, seed+1, ….

        ``styles`` stacks style LoRAs ("tarot", "tarot:0.8", ("tarot", 0.8) or {"tarot": 0.8});
        ``image_prompt`` is an IP-Adapter reference image. ``request_id`` is an idempotency key
        (repeating it re-attaches to the same job).

        Example::

            client.generate("a knight", width=512, height=512, seed=7).image().save("knight.png")
        """
        request = generate_pb2.GenerateRequest(
            prompt=prompt,
            styles=c.styles(styles),
            options=job_options(request_id, priority, cancel_on_disconnect),
            **c.optional_fields(
                width=width, height=height, steps=steps, variants=variants, seed=seed, guidance=guidance
            ),
        )
        images = _image_prompt(request, image_prompt, image_prompt_weight)
        return cast(HImage, self._submit(JobCall[Never]("GenerateService", "Generate", request, images)))

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
        priority: Priority = None,
        cancel_on_disconnect: bool = False,
    ) -> HImage:
        """Edit an image from an instruction with FLUX.1-Kontext.

        Example::

            client.edit("street.jpg", "make it night").image().save("night.png")
        """
        request = edit_pb2.EditRequest(
            prompt=prompt,
            styles=c.styles(styles),
            options=job_options(request_id, priority, cancel_on_disconnect),
            **c.optional_fields(
                steps=steps, variants=variants, seed=seed, guidance=guidance, upscaler=c.upscaler(upscaler)
            ),
        )
        images = [ImageSlot(request, "image", image), *_image_prompt(request, image_prompt, image_prompt_weight)]
        return cast(HImage, self._submit(JobCall[Never]("EditService", "Edit", request, images)))

    def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput | None,
        prompt: str,
        *,
        auto_mask: str | None = None,
        auto_mask_threshold: float | None = None,
        auto_mask_dilate: int | None = None,
        feather: int | None = None,
        guidance: float | None = None,
        steps: int | None = None,
        seed: int | None = None,
        variants: int | None = None,
        upscaler: int | str | None = None,
        request_id: str | None = None,
        priority: Priority = None,
        cancel_on_disconnect: bool = False,
    ) -> HImage:
        """Regenerate the white part of ``mask`` with FLUX.1-Fill.

        The mask is an image or asset (a ``segment`` result's ``mask`` works). Or give
        ``mask=None, auto_mask="her coat"``: the SDK first runs a ``segment`` job for that text
        (with ``auto_mask_threshold`` / ``auto_mask_dilate``) and inpaints with its mask; the
        handle follows the inpaint job. (In a pipeline, a ``segment`` step does the same.) With
        neither, the image's transparent pixels are repainted (a ``remove_background`` cut-out
        gets a new backdrop).

        Example::

            client.inpaint("portrait.png", None, "a red velvet coat", auto_mask="her coat").image()
        """
        if mask is not None and auto_mask is not None:
            raise ValueError("give mask or auto_mask, not both")
        request = inpaint_pb2.InpaintRequest(
            prompt=prompt,
            options=job_options(request_id, priority, cancel_on_disconnect),
            **c.optional_fields(
                feather=feather,
                steps=steps,
                variants=variants,
                seed=seed,
                guidance=guidance,
                upscaler=c.upscaler(upscaler),
            ),
        )
        images = [ImageSlot(request, "image", image)]
        dependencies = []
        if mask is not None:
            images.append(ImageSlot(request, "mask", mask))
        elif auto_mask is not None:
            segment = segment_pb2.SegmentRequest(
                text=auto_mask or "",
                options=job_options(None, priority, cancel_on_disconnect),
                **c.optional_fields(threshold=auto_mask_threshold, dilate=auto_mask_dilate),
            )
            segment_images = [ImageSlot(segment, "image", image)]
            segment_call = JobCall[Segmentation]("SegmentService", "Segment", segment, segment_images)
            dependencies.append(Dependency(segment_call, request, "mask"))
        call = JobCall[Never]("InpaintService", "Inpaint", request, images, dependencies)
        return cast(HImage, self._submit(call))

    def outpaint(
        self,
        image: ImageInput,
        prompt: str = "",
        *,
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        feather: int | None = None,
        guidance: float | None = None,
        steps: int | None = None,
        seed: int | None = None,
        variants: int | None = None,
        upscaler: int | str | None = None,
        request_id: str | None = None,
        priority: Priority = None,
        cancel_on_disconnect: bool = False,
    ) -> HImage:
        """Extend the canvas by the given pixels per side and fill the new area with FLUX.1-Fill.

        Example::

            wide = client.outpaint("room.png", "more of the room", left=256, right=256).image()
        """
        request = inpaint_pb2.OutpaintRequest(
            prompt=prompt,
            left=left,
            right=right,
            top=top,
            bottom=bottom,
            options=job_options(request_id, priority, cancel_on_disconnect),
            **c.optional_fields(
                feather=feather,
                steps=steps,
                variants=variants,
                seed=seed,
                guidance=guidance,
                upscaler=c.upscaler(upscaler),
            ),
        )
        call = JobCall[Never]("InpaintService", "Outpaint", request, [ImageSlot(request, "image", image)])
        return cast(HImage, self._submit(call))

    def qwen_edit(
        self,
        image: ImageInput,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        guidance: float | None = None,
        steps: int | None = None,
        seed: int | None = None,
        variants: int | None = None,
        upscaler: int | str | None = None,
        request_id: str | None = None,
        priority: Priority = None,
        cancel_on_disconnect: bool = False,
    ) -> HImage:
        """Edit an image from an instruction with Qwen-Image-Edit.

        Example::

            client.qwen_edit("cat.png", "put a hat on the cat", negative_prompt="blurry").image()
        """
        request = qwen_edit_pb2.QwenEditServiceEditRequest(
            prompt=prompt,
            options=job_options(request_id, priority, cancel_on_disconnect),
            **c.optional_fields(
                negative_prompt=negative_prompt,
                steps=steps,
                variants=variants,
                seed=seed,
                guidance=guidance,
                upscaler=c.upscaler(upscaler),
            ),
        )
        call = JobCall[Never]("QwenEditService", "Edit", request, [ImageSlot(request, "image", image)])
        return cast(HImage, self._submit(call))

    def control(
        self,
        control_image: ImageInput,
        prompt: str,
        control_type: int | str,
        *,
        control_scale: float | None = None,
        preprocess: int | str | None = None,
        width: int | None = None,
        height: int | None = None,
        guidance: float | None = None,
        image_prompt: ImageInput | None = None,
        image_prompt_weight: float | None = None,
        steps: int | None = None,
        seed: int | None = None,
        variants: int | None = None,
        upscaler: int | str | None = None,
        request_id: str | None = None,
        priority: Priority = None,
        cancel_on_disconnect: bool = False,
    ) -> HImage:
        """Generate following a conditioning map with ControlNet Union-Pro.

        ``control_type`` is "canny", "depth" or "pose"; ``preprocess="canny"`` makes the edge map
        on the server from a plain photo. ``width`` / ``height`` None mean the control image's size.

        Example::

            client.control("photo.jpg", "a watercolor city", "canny", preprocess="canny").image()
        """
        request = control_pb2.ControlRequest(
            prompt=prompt,
            control_type=c.control_type(control_type),  # type: ignore[arg-type]  # an int of the enum
            options=job_options(request_id, priority, cancel_on_disconnect),
            **c.optional_fields(
                preprocess=c.preprocess(preprocess),
                width=width,
                height=height,
                steps=steps,
                variants=variants,
                seed=seed,
                guidance=guidance,
                control_scale=control_scale,
                upscaler=c.upscaler(upscaler),
            ),
        )
        images = [
            ImageSlot(request, "control_image", control_image),
            *_image_prompt(request, image_prompt, image_prompt_weight),
        ]
        return cast(HImage, self._submit(JobCall[Never]("ControlService", "Control", request, images)))

    def upscale(
        self,
        image: ImageInput,
        *,
        upscaler: int | str | None = None,
        scale: float | None = None,
        tile: int | None = None,
        overlap: int | None = None,
        request_id: str | None = None,
        priority: Priority = None,
        cancel_on_disconnect: bool = False,
    ) -> HImage:
        """Enlarge an image: ``upscaler`` "realesrgan" (the default, tiled) or "lanczos".

        Example::

            big = client.upscale("small.png", scale=4).image()
        """
        request = upscale_pb2.UpscaleRequest(
            options=job_options(request_id, priority, cancel_on_disconnect),
            **c.optional_fields(upscaler=c.upscaler(upscaler), scale=scale, tile=tile, overlap=overlap),
        )
        call = JobCall[Never]("UpscaleService", "Upscale", request, [ImageSlot(request, "image", image)])
        return cast(HImage, self._submit(call))

    def remove_background(
        self,
        image: ImageInput,
        *,
        return_mask: bool = False,
        request_id: str | None = None,
        priority: Priority = None,
        cancel_on_disconnect: bool = False,
    ) -> HImage:
        """Cut the subject out with BiRefNet: an RGBA PNG (and the mask as a second output).

        Example::

            cutout = client.remove_background("product.jpg").image()
        """
        request = background_pb2.RemoveBackgroundRequest(
            return_mask=return_mask, options=job_options(request_id, priority, cancel_on_disconnect)
        )
        call = JobCall[Never]("BackgroundService", "RemoveBackground", request, [ImageSlot(request, "image", image)])
        return cast(HImage, self._submit(call))

    def segment(
        self,
        image: ImageInput,
        text: str,
        *,
        threshold: float | None = None,
        dilate: int | None = None,
        feather: int | None = None,
        request_id: str | None = None,
        priority: Priority = None,
        cancel_on_disconnect: bool = False,
    ) -> HSeg:
        """Make a mask of what ``text`` describes with CLIPSeg; the result is a :class:`~paletta.Segmentation`.

        Example::

            seg = client.segment("landscape.png", "the sky", dilate=4).result()
            print(seg.coverage)
            client.inpaint("landscape.png", seg.mask, "a stormy sky").image()
        """
        request = segment_pb2.SegmentRequest(
            text=text,
            options=job_options(request_id, priority, cancel_on_disconnect),
            **c.optional_fields(threshold=threshold, dilate=dilate, feather=feather),
        )
        call = JobCall[Segmentation]("SegmentService", "Segment", request, [ImageSlot(request, "image", image)])
        return cast(HSeg, self._submit(call))

    def detect(
        self,
        image: ImageInput,
        *,
        threshold: float | None = None,
        request_id: str | None = None,
        priority: Priority = None,
        cancel_on_disconnect: bool = False,
    ) -> HDet:
        """Find COCO objects with DETR; the result is :class:`~paletta.Detections`.

        Example::

            for d in client.detect("street.jpg").result():
                print(d.label, d.score, d.box.x_min, d.box.y_min)
        """
        request = detect_pb2.DetectRequest(
            options=job_options(request_id, priority, cancel_on_disconnect),
            **c.optional_fields(threshold=threshold),
        )
        call = JobCall[Detections]("DetectService", "Detect", request, [ImageSlot(request, "image", image)])
        return cast(HDet, self._submit(call))

    def ground(
        self,
        image: ImageInput,
        queries: str | Sequence[str],
        *,
        threshold: float | None = None,
        request_id: str | None = None,
        priority: Priority = None,
        cancel_on_disconnect: bool = False,
    ) -> HDet:
        """Find what text queries describe with OWLv2; the result is :class:`~paletta.Detections`.

        Example::

            boxes = client.ground("cave.png", ["the dragon"]).result().detections
        """
        request = detect_pb2.GroundRequest(
            queries=[queries] if isinstance(queries, str) else list(queries),
            options=job_options(request_id, priority, cancel_on_disconnect),
            **c.optional_fields(threshold=threshold),
        )
        call = JobCall[Detections]("DetectService", "Ground", request, [ImageSlot(request, "image", image)])
        return cast(HDet, self._submit(call))

    def caption(
        self,
        image: ImageInput,
        *,
        depth: int | str | None = None,
        max_tokens: int | None = None,
        request_id: str | None = None,
        priority: Priority = None,
        cancel_on_disconnect: bool = False,
    ) -> HCap:
        """Describe an image: ``depth`` "fast" (BLIP-large, the default) or "deep" (BLIP-2).

        The result is a :class:`~paletta.Caption`.

        Example::

            print(client.caption("photo.jpg", depth="deep").result().text)
        """
        request = caption_pb2.CaptionRequest(
            options=job_options(request_id, priority, cancel_on_disconnect),
            **c.optional_fields(depth=c.caption_depth(depth), max_tokens=max_tokens),
        )
        call = JobCall[Caption]("CaptionService", "Caption", request, [ImageSlot(request, "image", image)])
        return cast(HCap, self._submit(call))

    def analyze(
        self,
        image: ImageInput,
        *,
        depth: int | str | None = None,
        threshold: float | None = None,
        request_id: str | None = None,
        priority: Priority = None,
        cancel_on_disconnect: bool = False,
    ) -> HCap:
        """Caption plus DETR object labels in one job; the result is a :class:`~paletta.Caption` with ``objects``.

        Example::

            caption = client.analyze("photo.jpg").result()
            print(caption.text, caption.objects)
        """
        request = caption_pb2.AnalyzeRequest(
            options=job_options(request_id, priority, cancel_on_disconnect),
            **c.optional_fields(depth=c.caption_depth(depth), threshold=threshold),
        )
        call = JobCall[Caption]("CaptionService", "Analyze", request, [ImageSlot(request, "image", image)])
        return cast(HCap, self._submit(call))

    def expand(
        self,
        prompt: str,
        *,
        seed: int | None = None,
        max_tokens: int | None = None,
        request_id: str | None = None,
        priority: Priority = None,
        cancel_on_disconnect: bool = False,
    ) -> HExp:
        """Rewrite a short prompt as a verbose FLUX-style description; result: :class:`~paletta.PromptExpansion`.

        Example::

            print(client.expand("a cozy cabin", seed=1).result().expanded)
        """
        request = prompt_pb2.ExpandRequest(
            prompt=prompt,
            options=job_options(request_id, priority, cancel_on_disconnect),
            **c.optional_fields(seed=seed, max_tokens=max_tokens),
        )
        return cast(HExp, self._submit(JobCall[PromptExpansion]("PromptService", "Expand", request)))

    def identity(
        self,
        face: ImageInput,
        prompt: str,
        *,
        id_strength: float | None = None,
        start_step: int | None = None,
        face_index: int | None = None,
        true_cfg: float | None = None,
        negative_prompt: str | None = None,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        seed: int | None = None,
        variants: int | None = None,
        styles: StylesInput = None,
        request_id: str | None = None,
        priority: Priority = None,
        cancel_on_disconnect: bool = False,
    ) -> HFace:
        """Text to image keeping the face in ``face`` (PuLID-FLUX on FLUX.1-dev).

        ``id_strength`` in [0, 2] (default 1.0; 0 = plain FLUX.1-dev), ``start_step`` the first
        step that gets the identity (default 0), ``face_index`` which face (largest first, default
        the largest), ``true_cfg`` > 1 turns on true CFG with ``negative_prompt``. Each output's
        :class:`~paletta.FaceIdentity` result gives the face box, score and the face crop asset.
        A photo without a face fails the job (:class:`~paletta.FailedPrecondition`, reason NO_FACE).

        Example::

            job = client.identity("me.jpg", "portrait of a knight, oil painting", seed=3)
            job.image().save("knight.png")
            print(job.result().box, job.result().score)
        """
        request = identity_pb2.IdentityServiceGenerateRequest(
            prompt=prompt,
            styles=c.styles(styles),
            options=job_options(request_id, priority, cancel_on_disconnect),
            **c.optional_fields(
                id_strength=id_strength, start_step=start_step, face_index=face_index, true_cfg=true_cfg,
                negative_prompt=negative_prompt, guidance=guidance, width=width, height=height, steps=steps,
                seed=seed, variants=variants,
            ),
        )
        call = JobCall[FaceIdentity]("IdentityService", "Generate", request, [ImageSlot(request, "face", face)])
        return cast(HFace, self._submit(call))

    def pipeline(
        self,
        steps: str | Sequence[job_spec_pb2.JobSpec | Message],
        *,
        image: ImageInput | None = None,
        styles: StylesInput = None,
        request_id: str | None = None,
        priority: Priority = None,
        cancel_on_disconnect: bool = False,
    ) -> HAny:
        """Run a chain of steps as one job, each on the previous step's image.

        ``steps`` is a pipeline script (see :mod:`paletta.pipeline`), or JobSpec messages or
        capability requests (``GenerateRequest``, ``SegmentRequest``, …; leave their image unset
        to chain). ``image`` is the optional starting image; ``styles``, a script's default styles
        (for its generate and edit lines with an empty style slot). Every step's outputs come back
        in order; their ``parameters`` name the step.

        Example::

            job = client.pipeline('''
                [generate|tarot] knight in stormy mountain pass
                [auto_mask] the knight
                [inpaint] in obsidian cyborg armor with neon glow
            ''')
            final = list(job.images())[-1]
        """
        if isinstance(steps, str):
            specs = pipeline_script.parse(steps, has_image=image is not None, styles=styles)
        elif styles:
            raise ValueError("styles= is the default of a script's lines; give each step message its own styles")
        else:
            specs = [pipeline_script.to_spec(step) for step in steps]
        request = job_spec_pb2.RunPipelineRequest(
            steps=specs, options=job_options(request_id, priority, cancel_on_disconnect)
        )
        images = [ImageSlot(request, "image", image)] if image is not None else []
        return cast(HAny, self._submit(JobCall[Result]("PipelineService", "RunPipeline", request, images)))

