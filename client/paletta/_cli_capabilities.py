"""One ``paletta`` command per capability, each with every field of its request.

Every command submits through the SDK, follows the job (see :func:`paletta._cli_base.follow_job`)
and writes image outputs to ``-o`` (checked writable before submitting).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from paletta import _cli_output as out
from paletta import _common as c
from paletta import pipeline as pipeline_script
from paletta._cli_base import (
    GLOBAL_PARAMS,
    IMAGE,
    diffusion_options,
    follow_job,
    global_options,
    image_prompt_options,
    job_options,
    output_option,
    sdk_job_kwargs,
    style_options,
    upscale_with_option,
    upscaler_option,
)
from paletta.client import Client
from paletta.results import Caption, Detections, PromptExpansion, Segmentation, result_of
from paletta.v1 import job_pb2

CAPABILITY_COMMANDS: list[click.Command] = []
F = TypeVar("F", bound=Callable[..., Any])


def capability(name: str, example: str) -> Callable[[Callable[..., Any]], click.Command]:
    """Declare a capability command: global options, help with an example."""

    def decorate(f: Callable[..., Any]) -> click.Command:
        command = click.command(name, epilog=f"\b\nExample:\n  {example}")(global_options(f))
        # The command's own options first in --help, the global ones after them.
        own = [p for p in command.params if p.name not in GLOBAL_PARAMS]
        command.params = own + [p for p in command.params if p.name in GLOBAL_PARAMS]
        CAPABILITY_COMMANDS.append(command)
        return command

    return decorate


def _context(variants: int | None) -> out.JobContext:
    return out.JobContext(variants=variants or 1)


def show_result(output: job_pb2.JobOutput) -> None:
    """A typed result for people, on stdout."""
    result = result_of(output)
    if isinstance(result, Caption):
        print(result.text)
        if result.objects:
            print("objects: " + ", ".join(result.objects))
    elif isinstance(result, PromptExpansion):
        print(result.expanded)
    elif isinstance(result, Segmentation):
        print(f"mask {result.mask} coverage {result.coverage:.3f}")
    elif isinstance(result, Detections):
        table = Table("label", "score", "x_min", "y_min", "x_max", "y_max", title=None, box=None)
        for d in result:
            b = d.box
            table.add_row(d.label, f"{d.score:.3f}", *(f"{v:.0f}" for v in (b.x_min, b.y_min, b.x_max, b.y_max)))
        if len(result):
            Console(width=200 if not sys.stdout.isatty() else None).print(table)
        else:
            print("no detections")


# -- diffusion ------------------------------------------------------------------------------------


@capability("generate", "paletta generate 'a knight in a storm' -o knight.png --variants 2 --style tarot:0.8")
@click.argument("prompt")
@click.option("--width", type=click.IntRange(16, 2048), show_default="1024 capped to the profile's max edge",
              help="Width in pixels, a multiple of 16 up to the profile's max edge.")
@click.option("--height", type=click.IntRange(16, 2048), show_default="1024 capped to the profile's max edge",
              help="Height in pixels, as --width.")
@diffusion_options("0 (schnell); in [0, 20]", steps_default="4")
@style_options
@image_prompt_options
@job_options
def generate(prompt: str, output: Path, no_progress: bool, **kw: Any) -> int:
    """Text to image (FLUX.1-schnell)."""
    job = sdk_job_kwargs(kw)
    return follow_job(
        lambda client: client.generate(prompt, **kw, **job),
        output=output, no_progress=no_progress, context=_context(kw["variants"]),
    )


@capability("edit", "paletta edit street.jpg 'make it night' -o night.png")
@click.argument("image", type=IMAGE)
@click.argument("prompt")
@diffusion_options("2.5; in [0, 20]")
@style_options
@image_prompt_options
@upscaler_option
@job_options
def edit(image: str, prompt: str, output: Path, no_progress: bool, **kw: Any) -> int:
    """Edit an image from an instruction (FLUX.1-Kontext)."""
    job = sdk_job_kwargs(kw)
    return follow_job(
        lambda client: client.edit(image, prompt, **kw, **job),
        output=output, no_progress=no_progress, context=_context(kw["variants"]),
    )


@capability("inpaint", "paletta inpaint portrait.png 'a red velvet coat' --auto-mask 'her coat' -o coat.png")
@click.argument("image", type=IMAGE)
@click.argument("prompt")
@click.option("--mask", type=IMAGE, help="Mask image (white = regenerate) or a segment job's mask asset.")
@click.option("--auto-mask", metavar="TEXT", help="Instead of --mask: make the mask of what TEXT describes (CLIPSeg).")
@click.option("--auto-mask-threshold", type=click.FloatRange(0, 1), show_default="0.4",
              help="CLIPSeg threshold of --auto-mask.")
@click.option("--auto-mask-dilate", type=click.IntRange(0, 256), show_default="0",
              help="Grow the --auto-mask mask by this many pixels.")
@click.option("--feather", type=click.IntRange(0, 256), show_default="0", help="Feather the mask edge (pixels).")
@diffusion_options("30; in [0, 100]")
@upscaler_option
@job_options
def inpaint(image: str, prompt: str, output: Path, no_progress: bool, mask: str | None, **kw: Any) -> int:
    """Regenerate the masked part of an image (FLUX.1-Fill). Give --mask FILE or --auto-mask TEXT; with
    neither, the image's transparent pixels are repainted (a remove-bg cut-out gets a new backdrop)."""
    if mask is not None and kw["auto_mask"] is not None:
        raise click.UsageError("give --mask FILE or --auto-mask TEXT, not both")
    job = sdk_job_kwargs(kw)
    return follow_job(
        lambda client: client.inpaint(image, mask, prompt, **kw, **job),
        output=output, no_progress=no_progress, context=_context(kw["variants"]),
    )


def _side(name: str) -> Callable[[F], F]:
    return click.option(f"--{name}", type=click.IntRange(0, 2048), default=0, help=f"Pixels added on the {name}.")


@capability("outpaint", "paletta outpaint room.png 'more of the room' --left 256 --right 256 -o wide.png")
@click.argument("image", type=IMAGE)
@click.argument("prompt", default="")
@_side("left")
@_side("right")
@_side("top")
@_side("bottom")
@click.option("--feather", type=click.IntRange(0, 256), show_default="0", help="Feather the seam (pixels).")
@diffusion_options("30; in [0, 100]")
@upscaler_option
@job_options
def outpaint(image: str, prompt: str, output: Path, no_progress: bool, **kw: Any) -> int:
    """Extend the canvas per side and fill the new area (FLUX.1-Fill); PROMPT may be empty."""
    if not any(kw[side] for side in ("left", "right", "top", "bottom")):
        raise click.UsageError("give at least one of --left, --right, --top, --bottom")
    job = sdk_job_kwargs(kw)
    return follow_job(
        lambda client: client.outpaint(image, prompt, **kw, **job),
        output=output, no_progress=no_progress, context=_context(kw["variants"]),
    )


@capability("qwen-edit", "paletta qwen-edit cat.png 'put a hat on the cat' --negative-prompt blurry -o hat.png")
@click.argument("image", type=IMAGE)
@click.argument("prompt")
@click.option("--negative-prompt", metavar="TEXT", help="What to avoid.")
@diffusion_options("4; true CFG in [1, 20]")
@upscaler_option
@job_options
def qwen_edit(image: str, prompt: str, output: Path, no_progress: bool, **kw: Any) -> int:
    """Edit an image from an instruction (Qwen-Image-Edit)."""
    job = sdk_job_kwargs(kw)
    return follow_job(
        lambda client: client.qwen_edit(image, prompt, **kw, **job),
        output=output, no_progress=no_progress, context=_context(kw["variants"]),
    )


@capability("control", "paletta control photo.jpg 'a watercolor city' --type canny --preprocess canny -o city.png")
@click.argument("image", type=IMAGE)
@click.argument("prompt")
@click.option("--type", "control_type", type=click.Choice(["canny", "depth", "pose"], case_sensitive=False),
              required=True, help="What the control image is.")
@click.option("--preprocess", type=click.Choice(["none", "canny"], case_sensitive=False), show_default="none",
              help="Make the map on the server: canny edges of a plain photo (with --type canny).")
@click.option("--control-scale", type=click.FloatRange(0, 1), show_default="0.7", help="Conditioning strength.")
@click.option("--width", type=click.IntRange(16, 2048), show_default="the control image's",
              help="Output width, a multiple of 16.")
@click.option("--height", type=click.IntRange(16, 2048), show_default="the control image's",
              help="Output height, a multiple of 16.")
@diffusion_options("3.5; in [0, 20]")
@image_prompt_options
@upscaler_option
@job_options
def control(image: str, prompt: str, output: Path, no_progress: bool, control_type: str, **kw: Any) -> int:
    """Generate following a conditioning map (ControlNet Union-Pro)."""
    job = sdk_job_kwargs(kw)
    return follow_job(
        lambda client: client.control(image, prompt, control_type, **kw, **job),
        output=output, no_progress=no_progress, context=_context(kw["variants"]),
    )


@capability("identity", "paletta identity me.jpg 'portrait of a knight, oil painting' -o knight.png --seed 3")
@click.argument("face", type=IMAGE)
@click.argument("prompt")
@click.option("--id-strength", type=click.FloatRange(0, 2), show_default="1.0",
              help="How strongly the face is kept; 0 = plain FLUX.1-dev.")
@click.option("--start-step", type=click.IntRange(0), show_default="0",
              help="First (0-based) step that gets the identity, up to steps - 1.")
@click.option("--face-index", type=click.IntRange(0), show_default="0 (the largest face)",
              help="Which face of the photo, largest first.")
@click.option("--true-cfg", type=click.FloatRange(1, 10), show_default="1 (off)",
              help="True CFG scale; > 1 also runs --negative-prompt (twice the compute).")
@click.option("--negative-prompt", metavar="TEXT", show_default="PuLID's", help="What to avoid, with --true-cfg > 1.")
@click.option("--width", type=click.IntRange(16, 2048), show_default="1024 capped to the profile's max edge",
              help="Width in pixels, a multiple of 16.")
@click.option("--height", type=click.IntRange(16, 2048), show_default="1024 capped to the profile's max edge",
              help="Height in pixels, a multiple of 16.")
@diffusion_options("4.0; distilled guidance in [0, 20]", steps_default="20 (8 under hyper)")
@style_options
@job_options
def identity(face: str, prompt: str, output: Path, no_progress: bool, **kw: Any) -> int:
    """Text to image keeping the face of a photo (PuLID-FLUX on FLUX.1-dev)."""
    job = sdk_job_kwargs(kw)
    return follow_job(
        lambda client: client.identity(face, prompt, **kw, **job),
        output=output, no_progress=no_progress, context=_context(kw["variants"]),
    )


# -- images in, images out ------------------------------------------------------------------------


@capability("upscale", "paletta upscale small.png -o big.png --scale 4")
@click.argument("image", type=IMAGE)
@output_option(True, "Output image.")
@upscale_with_option
@click.option("--scale", type=click.FloatRange(1, 4), show_default="4", help="Scale factor.")
@click.option("--tile", type=click.IntRange(32, 2048), show_default="256",
              help="Real-ESRGAN tile edge in input pixels.")
@click.option("--overlap", type=click.IntRange(0), show_default="16, or tile/4 when smaller",
              help="Overlap between tiles, up to tile/4.")
@job_options
def upscale(image: str, output: Path, no_progress: bool, **kw: Any) -> int:
    """Enlarge an image (Real-ESRGAN, tiled, or LANCZOS)."""
    job = sdk_job_kwargs(kw)
    return follow_job(lambda client: client.upscale(image, **kw, **job), output=output, no_progress=no_progress)


@capability("remove-bg", "paletta remove-bg product.jpg -o cutout.png --mask")
@click.argument("image", type=IMAGE)
@output_option(True, "RGBA cut-out (the mask, with --mask, goes to OUTPUT-1).")
@click.option("--mask", "return_mask", is_flag=True, help="Also write the alpha mask.")
@job_options
def remove_bg(image: str, output: Path, no_progress: bool, return_mask: bool, **kw: Any) -> int:
    """Cut out the subject (BiRefNet): an RGBA PNG."""
    job = sdk_job_kwargs(kw)
    return follow_job(
        lambda client: client.remove_background(image, return_mask=return_mask, **job),
        output=output, no_progress=no_progress,
    )


@capability("segment", "paletta segment landscape.png 'the sky' -o sky-mask.png --dilate 4")
@click.argument("image", type=IMAGE)
@click.argument("text")
@output_option(False, "Write the mask here (white = selected).")
@click.option("--threshold", type=click.FloatRange(0, 1), show_default="0.4", help="Probability threshold.")
@click.option("--dilate", type=click.IntRange(0, 256), show_default="0", help="Grow the mask (pixels).")
@click.option("--feather", type=click.IntRange(0, 256), show_default="0", help="Feather the mask (pixels).")
@job_options
def segment(image: str, text: str, output: Path | None, no_progress: bool, **kw: Any) -> int:
    """Make a mask of what TEXT describes (CLIPSeg); prints the mask asset and its coverage."""
    job = sdk_job_kwargs(kw)
    return follow_job(
        lambda client: client.segment(image, text, **kw, **job),
        output=output, no_progress=no_progress, show_result=show_result,
    )


# -- images in, text out --------------------------------------------------------------------------


@capability("detect", "paletta detect street.jpg --threshold 0.5")
@click.argument("image", type=IMAGE)
@click.option("--threshold", type=click.FloatRange(0, 1), show_default="0.7", help="Minimum score.")
@job_options
def detect(image: str, no_progress: bool, **kw: Any) -> int:
    """Find COCO objects (DETR): label, score and box per line."""
    job = sdk_job_kwargs(kw)
    return follow_job(
        lambda client: client.detect(image, **kw, **job), output=None, no_progress=no_progress,
        show_result=show_result,
    )


@capability("ground", "paletta ground cave.png 'the dragon' 'a torch'")
@click.argument("image", type=IMAGE)
@click.argument("queries", nargs=-1, required=True)
@click.option("--threshold", type=click.FloatRange(0, 1), show_default="0.1", help="Minimum score.")
@job_options
def ground(image: str, queries: tuple[str, ...], no_progress: bool, **kw: Any) -> int:
    """Find what text QUERIES describe (OWLv2)."""
    job = sdk_job_kwargs(kw)
    return follow_job(
        lambda client: client.ground(image, list(queries), **kw, **job), output=None, no_progress=no_progress,
        show_result=show_result,
    )


DEPTHS = click.Choice(["fast", "deep"], case_sensitive=False)


@capability("caption", "paletta caption photo.jpg --depth deep")
@click.argument("image", type=IMAGE)
@click.option("--depth", type=DEPTHS, show_default="fast", help="fast: BLIP-large, one sentence; "
              "deep: BLIP-2, several.")
@click.option("--deep", is_flag=True, help="Same as --depth deep.")
@click.option("--max-tokens", type=click.IntRange(1, 512), show_default="40 fast, 120 deep",
              help="Maximum new tokens.")
@job_options
def caption(image: str, no_progress: bool, deep: bool, depth: str | None, **kw: Any) -> int:
    """Describe an image (BLIP / BLIP-2)."""
    job = sdk_job_kwargs(kw)
    if deep and depth not in (None, "deep"):
        raise click.BadParameter(f"--deep contradicts --depth {depth}; give one of them", param_hint="--deep")
    depth = "deep" if deep else depth
    return follow_job(
        lambda client: client.caption(image, depth=depth, **kw, **job), output=None, no_progress=no_progress,
        show_result=show_result,
    )


@capability("analyze", "paletta analyze photo.jpg --threshold 0.8")
@click.argument("image", type=IMAGE)
@click.option("--depth", type=DEPTHS, show_default="fast", help="Captioner, as for `caption`.")
@click.option("--threshold", type=click.FloatRange(0, 1), show_default="0.7", help="Minimum DETR score.")
@job_options
def analyze(image: str, no_progress: bool, **kw: Any) -> int:
    """Caption plus DETR object labels in one job."""
    job = sdk_job_kwargs(kw)
    return follow_job(
        lambda client: client.analyze(image, **kw, **job), output=None, no_progress=no_progress,
        show_result=show_result,
    )


@capability("expand", "paletta expand 'a cozy cabin' --seed 1")
@click.argument("prompt")
@click.option("--seed", type=int, show_default="0", help="Sampling seed.")
@click.option("--max-tokens", type=click.IntRange(1, 512), show_default="160", help="Maximum new tokens.")
@job_options
def expand(prompt: str, no_progress: bool, **kw: Any) -> int:
    """Rewrite a short prompt as a verbose FLUX-style description (Qwen2.5)."""
    job = sdk_job_kwargs(kw)
    return follow_job(
        lambda client: client.expand(prompt, **kw, **job), output=None, no_progress=no_progress,
        show_result=show_result,
    )


@capability(
    "pipeline",
    "printf '[generate|tarot] a knight\\n[auto_mask] the knight\\n[inpaint] obsidian armor\\n' "
    "| paletta pipeline - -o chain.png",
)
@click.argument("script", type=click.File("r"))
@output_option(True, "Every step's images in order: OUTPUT, OUTPUT-1, …")
@click.option("--image", type=IMAGE, help="Starting image (file or assets/…).")
@click.option("--style", "styles", multiple=True, metavar="NAME[:WEIGHT]",
              help="Default style of the generate and edit lines whose style slot is empty; repeat to stack.")
@job_options
def pipeline(script: Any, output: Path, no_progress: bool, image: str | None, styles: tuple[str, ...],
             **kw: Any) -> int:
    """Run a pipeline script as one job: a step per line, `[mode|style] text`.

    Modes: generate, edit, qwen, inpaint, auto_mask, upscale, remove_bg; SCRIPT is a file or -
    for standard input. Any other step (outpaint, control, detect, identity, …) and any field:
    give SCRIPT as a JSON list of JobSpecs, e.g. [{"generate": {"prompt": "a harbour"}},
    {"outpaint": {"prompt": "sea", "left": 128}}].
    """
    try:
        default_styles = c.styles(list(styles))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--style") from None
    try:
        steps = pipeline_script.parse(script.read(), has_image=image is not None, styles=default_styles)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="SCRIPT") from None
    if not steps:
        raise click.BadParameter("the script has no steps", param_hint="SCRIPT")
    job = sdk_job_kwargs(kw)
    names: list[str] = [step.WhichOneof("spec") or "?" for step in steps]

    def submit(client: Client) -> Any:
        return client.pipeline(steps, image=image, **job)

    return follow_job(
        submit, output=output, no_progress=no_progress, context=out.JobContext(pipeline_steps=names),
        show_result=show_result,
    )
