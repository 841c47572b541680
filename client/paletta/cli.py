"""The ``paletta`` command: generate and edit images, follow jobs, show status, run the server.

Examples::

    paletta generate "a knight" -o knight.png --variants 2 --style tarot:0.8
    paletta jobs list --state running
    paletta jobs watch jobs/42
    paletta status
    paletta serve --profile tiny --port 50051

``--address`` defaults to $PALETTA_ADDRESS or 127.0.0.1:50051, ``--token`` to $PALETTA_TOKEN.
``serve`` never imports torch itself; models load lazily in the server.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from paletta import _common as c
from paletta.client import Client, JobHandle
from paletta.errors import InvalidArgument, PalettaError
from paletta.v1 import job_pb2

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def make_client(args: argparse.Namespace) -> Client:
    """The SDK client for the global options (tests replace this)."""
    return Client(args.address, token=args.token or None, tls_root_cert=args.tls_root_cert or None)


# -- output files and progress ------------------------------------------------------------------


def output_path(base: Path, index: int) -> Path:
    """out.png for output 0, out-1.png, out-2.png … for the others."""
    return base if index == 0 else base.with_name(f"{base.stem}-{index}{base.suffix}")


def write_output(data: bytes, path: Path) -> None:
    """Write an output; PNG bytes as they are (keeping the parameters chunk), other suffixes converted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in ("", ".png"):
        path.write_bytes(data)
        return
    image = c.decode_image(data)
    if path.suffix.lower() in (".jpg", ".jpeg") and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image.save(path)


class ProgressBar:
    """A tqdm bar fed from job events: one bar per stage, reset when the stage changes."""

    def __init__(self, enabled: bool, file: TextIO | None = None) -> None:
        self.enabled = enabled
        self.file = file or sys.stderr
        self.bar: Any = None
        self.stage = ""
        self.updates = 0

    def _open(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=desc, file=self.file, disable=not self.enabled, leave=False, unit="step")

    def feed(self, event: job_pb2.JobEvent) -> None:
        kind = event.WhichOneof("kind")
        if kind == "queued" and event.queued.position > 0:
            self._open(0, f"queued (position {event.queued.position})")
        elif kind == "progress":
            p = event.progress
            desc = f"{p.stage} {p.model}".strip()
            # A new stage, or the same stage starting over (the next variant): a fresh bar.
            if self.bar is None or desc != self.stage or self.bar.total != p.total_steps or p.step < self.bar.n:
                self.stage = desc
                self._open(p.total_steps, desc)
            self.bar.n = p.step
            self.bar.refresh()
            self.updates += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def follow(
    client: Client,
    job: JobHandle[Any],
    *,
    out: Path | None,
    progress: bool,
    on_output: Callable[[job_pb2.JobOutput], None] | None = None,
) -> tuple[job_pb2.Job, list[Path]]:
    """Follow a job with a progress bar, saving image outputs next to ``out`` as they arrive."""
    bar = ProgressBar(progress)
    written: list[Path] = []
    try:
        for event in job:
            bar.feed(event)
            if event.HasField("output"):
                output = event.output
                if out is not None and output.asset.name:
                    path = output_path(out, output.index)
                    write_output(client.download(output.asset.name), path)
                    written.append(path)
                if on_output:
                    on_output(output)
    finally:
        bar.close()
    return job.wait(), written


def run_job(client: Client, args: argparse.Namespace, job: JobHandle[Any], **kwargs: Any) -> int:
    """Follow a job to its end; Ctrl-C cancels it."""
    print(f"{job.name}", file=sys.stderr)
    try:
        _, written = follow(client, job, out=getattr(args, "output", None), progress=not args.no_progress, **kwargs)
    except KeyboardInterrupt:
        client.cancel_job(job.name)
        print(f"cancelled {job.name}", file=sys.stderr)
        return EXIT_INTERRUPTED
    for path in written:
        print(path)
    return EXIT_OK


# -- commands -------------------------------------------------------------------------------------


def _diffusion_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "steps": args.steps,
        "seed": args.seed,
        "variants": args.variants,
        "guidance": args.guidance,
        "request_id": args.request_id,
        "priority": args.priority,
    }


def cmd_generate(client: Client, args: argparse.Namespace) -> int:
    job = client.generate(
        args.prompt,
        width=args.width,
        height=args.height,
        styles=args.style,
        image_prompt=args.image_prompt,
        image_prompt_weight=args.image_prompt_weight,
        **_diffusion_kwargs(args),
    )
    return run_job(client, args, job)


def cmd_edit(client: Client, args: argparse.Namespace) -> int:
    job = client.edit(args.image, args.prompt, styles=args.style, **_diffusion_kwargs(args))
    return run_job(client, args, job)


def cmd_upscale(client: Client, args: argparse.Namespace) -> int:
    job = client.upscale(args.image, upscaler=args.upscaler, scale=args.scale, tile=args.tile, priority=args.priority)
    return run_job(client, args, job)


def cmd_pipeline(client: Client, args: argparse.Namespace) -> int:
    script = sys.stdin.read() if args.script == "-" else Path(args.script).read_text()
    try:
        job = client.pipeline(script, image=args.image, priority=args.priority)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_job(client, args, job)


def cmd_remove_bg(client: Client, args: argparse.Namespace) -> int:
    job = client.remove_background(args.image, return_mask=args.mask, priority=args.priority)
    return run_job(client, args, job)


def cmd_segment(client: Client, args: argparse.Namespace) -> int:
    job = client.segment(args.image, args.text, threshold=args.threshold, priority=args.priority)
    return run_job(client, args, job, on_output=lambda o: print(f"coverage {o.segmentation.coverage:.3f}"))


def _print_result(output: job_pb2.JobOutput) -> None:
    kind = output.WhichOneof("result")
    if kind == "caption":
        print(output.caption.text)
        if output.caption.objects:
            print("objects: " + ", ".join(output.caption.objects))
    elif kind == "expansion":
        print(output.expansion.expanded)
    elif kind == "detections":
        for d in output.detections.detections:
            b = d.box
            print(f"{d.label}\t{d.score:.3f}\t{b.x_min:.0f},{b.y_min:.0f},{b.x_max:.0f},{b.y_max:.0f}")


def cmd_caption(client: Client, args: argparse.Namespace) -> int:
    depth = "deep" if args.deep else "fast"
    job = client.analyze(args.image, depth=depth) if args.objects else client.caption(args.image, depth=depth)
    return run_job(client, args, job, on_output=_print_result)


def cmd_detect(client: Client, args: argparse.Namespace) -> int:
    if args.query:
        job = client.ground(args.image, args.query, threshold=args.threshold)
    else:
        job = client.detect(args.image, threshold=args.threshold)
    return run_job(client, args, job, on_output=_print_result)


def cmd_expand(client: Client, args: argparse.Namespace) -> int:
    return run_job(client, args, client.expand(args.prompt, seed=args.seed), on_output=_print_result)


def _time(ts: Any) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if ts.seconds else "-"


def cmd_jobs_list(client: Client, args: argparse.Namespace) -> int:
    jobs = client.list_jobs(states=args.state or (), capability=args.capability or "", limit=args.limit)
    print(f"{'NAME':<40} {'STATE':<10} {'CAPABILITY':<18} {'CREATED':<19} OUTPUTS")
    for job in jobs:
        print(
            f"{job.name:<40} {c.state_label(job.state):<10} {job.capability:<18} "
            f"{_time(job.create_time):<19} {len(job.outputs)}"
        )
    return EXIT_OK


def describe_event(event: job_pb2.JobEvent) -> str:
    """One line per event for ``jobs watch``."""
    kind = event.WhichOneof("kind") or "?"
    text = f"{event.seq:>4} {kind}"
    if kind == "queued":
        text += f" position={event.queued.position}"
    elif kind == "progress":
        p = event.progress
        text += f" {p.stage} {p.step}/{p.total_steps}" + (f" {p.model}" if p.model else "")
    elif kind == "preview":
        text += f" step={event.preview.step} {len(event.preview.jpeg)} bytes"
    elif kind == "output":
        o = event.output
        text += f" index={o.index} {o.asset.name or o.WhichOneof('result') or ''}".rstrip()
        if o.seed:
            text += f" seed={o.seed}"
    elif kind == "finished":
        job = event.finished.job
        text += f" {c.state_label(job.state)}"
        if job.error.message:
            text += f": {job.error.message}"
    return text


def cmd_jobs_watch(client: Client, args: argparse.Namespace) -> int:
    job = client.attach(args.name, after_seq=args.after_seq)
    try:
        for event in job:
            print(describe_event(event), flush=True)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    job.wait()
    return EXIT_OK


def cmd_jobs_cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.cancel_job(args.name)
    print(f"{job.name} {c.state_label(job.state)}")
    return EXIT_OK


def cmd_jobs_get(client: Client, args: argparse.Namespace) -> int:
    job = client.get_job(args.name)
    print(f"name:       {job.name}\nstate:      {c.state_label(job.state)}\ncapability: {job.capability}")
    print(f"created:    {_time(job.create_time)}\nended:      {_time(job.end_time)}")
    if job.error.message:
        print(f"error:      {job.error.message}")
    for o in job.outputs:
        mark = " (approved)" if o.approved else ""
        print(f"output {o.index}: {o.asset.name or o.WhichOneof('result')} seed={o.seed}{mark}")
    return EXIT_OK


def cmd_jobs_approve(client: Client, args: argparse.Namespace) -> int:
    client.approve_output(args.name, args.index, approved=not args.withdraw)
    print(f"{args.name} output {args.index} {'unapproved' if args.withdraw else 'approved'}")
    return EXIT_OK


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    s = client.status()
    print(f"server:       {args.address} (version {s.version})")
    print(f"device:       {s.device}")
    print(f"profile:      {s.profile} ({s.quantization}), max edge {s.max_edge}")
    print(f"memory:       {c.human_bytes(s.memory_used_bytes)} of {c.human_bytes(s.memory_budget_bytes)} budget")
    print(f"queue:        {s.queue_length} waiting" + (f", running {s.running_job}" if s.running_job else ""))
    if s.HasField("gpu"):
        g = s.gpu
        print(
            f"gpu:          {g.name}: {c.human_bytes(g.memory_used_bytes)} / {c.human_bytes(g.memory_total_bytes)}, "
            f"{g.utilization_percent}%, {g.power_watts:.0f} W, {g.temperature_celsius} °C"
        )
    for m in s.loaded_models:
        print(f"loaded:       {m.key} {c.human_bytes(m.bytes)}")
    return EXIT_OK


def cmd_styles(client: Client, args: argparse.Namespace) -> int:
    for s in client.list_styles():
        trigger = f" trigger '{s.trigger_word}'" if s.trigger_word else ""
        print(f"{s.name:<12} {s.label} (weight {s.default_weight:g}){trigger}: {s.best_for}")
    return EXIT_OK


def cmd_models(client: Client, args: argparse.Namespace) -> int:
    for m in client.list_models():
        where = f"{m.source}@{m.revision}" if m.revision else m.source
        state = f"resident {c.human_bytes(m.bytes)}" if m.resident else "-"
        print(f"{m.key:<24} {','.join(m.capabilities):<24} {state:<18} {where} (${m.env_var})")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    # Imported here so that client commands never load the server (nor, through it, anything heavy).
    from paletta_server.config import load_config  # type: ignore[import-untyped,unused-ignore]
    from paletta_server.main import serve  # type: ignore[import-untyped,unused-ignore]

    config = load_config(
        args.data_dir,
        host=args.host,
        port=args.port,
        profile=args.profile,
        token=args.serve_token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    serve(config)
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------------------


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--address/--token/--tls-root-cert, accepted before or after the command."""

    def default(value: str) -> str:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--address",
        default=default(os.environ.get("PALETTA_ADDRESS", c.DEFAULT_ADDRESS)),
        help="server address host:port (env PALETTA_ADDRESS; default 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--token",
        default=default(os.environ.get("PALETTA_TOKEN", "")),
        help="bearer token (env PALETTA_TOKEN)",
    )
    parser.add_argument(
        "--tls-root-cert",
        default=default(os.environ.get("PALETTA_TLS_ROOT_CERT", "")),
        help="PEM root certificate to connect with TLS (env PALETTA_TLS_ROOT_CERT)",
    )


def _job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--priority", choices=["low", "normal", "high"], help="queue priority")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _diffusion_options(parser: argparse.ArgumentParser, *, styles: bool = True) -> None:
    parser.add_argument("-o", "--output", type=Path, required=True, help="output file; variants add -1, -2 …")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--seed", type=int, help="seed of the first variant (default: random)")
    parser.add_argument("--variants", type=int, help="number of images (default 1)")
    parser.add_argument("--guidance", type=float, help="guidance scale")
    parser.add_argument("--request-id", help="idempotency key: repeating it re-attaches to the same job")
    if styles:
        parser.add_argument(
            "--style",
            action="append",
            default=[],
            metavar="NAME[:WEIGHT]",
            help="style LoRA; repeat to stack",
        )
    _job_options(parser)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    parser = argparse.ArgumentParser(prog="paletta", description="Paletta image workstation client and server.")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[..., int], help_text: str, **kw: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text, **kw)
        p.set_defaults(func=func)
        return p

    p = add("generate", cmd_generate, "text to image (FLUX.1-schnell)")
    p.add_argument("prompt")
    p.add_argument("--width", type=int, help="multiple of 16 (default: 1024 capped to the profile)")
    p.add_argument("--height", type=int, help="multiple of 16 (default: 1024 capped to the profile)")
    p.add_argument("--image-prompt", help="IP-Adapter reference image (path or assets/…)")
    p.add_argument("--image-prompt-weight", type=float, help="IP-Adapter weight in [0, 2]")
    _diffusion_options(p)

    p = add("edit", cmd_edit, "edit an image from an instruction (FLUX.1-Kontext)")
    p.add_argument("image", help="path or assets/…")
    p.add_argument("prompt")
    _diffusion_options(p)

    p = add("upscale", cmd_upscale, "enlarge an image (Real-ESRGAN or LANCZOS)")
    p.add_argument("image")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--upscaler", choices=["realesrgan", "lanczos"])
    p.add_argument("--scale", type=float)
    p.add_argument("--tile", type=int, default=0)
    _job_options(p)

    p = add("pipeline", cmd_pipeline, "run a pipeline script ([mode|style] text per line) as one job")
    p.add_argument("script", help="a file of steps, or - for standard input")
    p.add_argument("-o", "--output", type=Path, required=True, help="every step's outputs: OUT, OUT-1, …")
    p.add_argument("--image", help="starting image (path or assets/…)")
    _job_options(p)

    p = add("remove-bg", cmd_remove_bg, "cut out the subject (BiRefNet): RGBA PNG")
    p.add_argument("image")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--mask", action="store_true", help="also write the mask (as OUTPUT-1)")
    _job_options(p)

    p = add("segment", cmd_segment, "text-prompted mask (CLIPSeg)")
    p.add_argument("image")
    p.add_argument("text")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--threshold", type=float)
    _job_options(p)

    p = add("caption", cmd_caption, "describe an image (BLIP / BLIP-2)")
    p.add_argument("image")
    p.add_argument("--deep", action="store_true", help="BLIP-2, several sentences")
    p.add_argument("--objects", action="store_true", help="also list DETR objects (analyze)")
    _job_options(p)

    p = add("detect", cmd_detect, "find objects (DETR), or what --query describes (OWLv2)")
    p.add_argument("image")
    p.add_argument("--query", action="append", default=[], help="text query; repeat for several")
    p.add_argument("--threshold", type=float)
    _job_options(p)

    p = add("expand", cmd_expand, "rewrite a short prompt verbosely (Qwen2.5)")
    p.add_argument("prompt")
    p.add_argument("--seed", type=int)
    _job_options(p)

    jobs = add("jobs", lambda *_: EXIT_USAGE, "list, watch, cancel, approve jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")

    def add_job(name: str, func: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        p = jobs_sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add_job("list", cmd_jobs_list, "jobs, newest first")
    p.add_argument("--state", action="append", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--capability")
    p.add_argument("--limit", type=int, default=50)
    p = add_job("watch", cmd_jobs_watch, "follow a job's events (replays from --after-seq)")
    p.add_argument("name")
    p.add_argument("--after-seq", type=int, default=0)
    p = add_job("cancel", cmd_jobs_cancel, "cancel a job")
    p.add_argument("name")
    p = add_job("get", cmd_jobs_get, "show one job")
    p.add_argument("name")
    p = add_job("approve", cmd_jobs_approve, "approve an output of a job")
    p.add_argument("name")
    p.add_argument("index", type=int, nargs="?", default=0)
    p.add_argument("--withdraw", action="store_true", help="remove the approval")

    add("status", cmd_status, "server, device, memory and queue")
    add("styles", cmd_styles, "style LoRAs")
    add("models", cmd_models, "models of the active profile")

    p = sub.add_parser("serve", help="run the server", description="Run the Paletta gRPC server until Ctrl-C.")
    p.set_defaults(func=cmd_serve)
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 50051; 0 picks a free one)")
    p.add_argument("--data-dir", type=Path, help="jobs, assets and models (default $PALETTA_DATA_DIR)")
    p.add_argument("--profile", choices=["fast", "hyper", "quality", "tiny"])
    p.add_argument("--token", dest="serve_token", help="require this bearer token (env PALETTA_TOKEN)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain for TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key for TLS")
    return parser


def _report(error: PalettaError) -> None:
    if isinstance(error, InvalidArgument) and error.field_violations:
        print("paletta: invalid request:", file=sys.stderr)
        for v in error.field_violations:
            print(f"  {v.field}: {v.description}", file=sys.stderr)
    else:
        print(f"paletta: {error}", file=sys.stderr)
    if error.retry_delay:
        print(f"  retry in {error.retry_delay:g} s", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``paletta`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    try:
        with make_client(args) as client:
            return int(args.func(client, args))
    except PalettaError as err:  # JobFailed and JobCancelled included
        _report(err)
        return EXIT_ERROR
    except (ValueError, OSError) as err:
        print(f"paletta: {err}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, ValueError) else EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `paletta jobs list | head`
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
