"""The ``paletta`` command's plumbing: global options, shared option sets, following a job.

Global options (``--address``, ``--token``, ``--tls-root-cert``, ``--json``) are accepted
before or after the command: every command carries them too, and whichever is given last wins.
They land in one :class:`Settings` kept in the Click context's ``meta``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from paletta import _cli_output as out
from paletta import _common as c
from paletta.client import Client, JobHandle
from paletta.errors import PalettaError
from paletta.results import result_of
from paletta.v1 import job_pb2

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

F = TypeVar("F", bound=Callable[..., Any])
_SETTINGS = "paletta.settings"
GLOBAL_PARAMS = frozenset({"address", "token", "tls_root_cert", "json_"})


@dataclass
class Settings:
    """The global options as given on the command line (None: not given, fall back to the environment)."""

    address: str | None = None
    token: str | None = None
    tls_root_cert: str | None = None
    json: bool = False
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    _client: Client | None = None

    @property
    def server_address(self) -> str:
        return self.address or self.environ.get("PALETTA_ADDRESS") or c.DEFAULT_ADDRESS

    @property
    def bearer_token(self) -> str | None:
        return self.token or self.environ.get("PALETTA_TOKEN") or None

    @property
    def root_cert(self) -> str | None:
        return self.tls_root_cert or self.environ.get("PALETTA_TLS_ROOT_CERT") or None

    def client(self) -> Client:
        """The SDK client for these settings, made once and closed when the command ends."""
        if self._client is None:
            self._client = make_client(self)
            click.get_current_context().call_on_close(self._client.close)
        return self._client


def make_client(settings: Settings) -> Client:
    """The SDK client (a seam for tests)."""
    cert = settings.root_cert
    if cert is not None and not Path(cert).exists():  # exists(): a pipe (<(…)) is fine
        raise click.BadParameter(f"{cert}: no such file", param_hint="--tls-root-cert / PALETTA_TLS_ROOT_CERT")
    return Client(settings.server_address, token=settings.bearer_token, tls_root_cert=cert)


def settings() -> Settings:
    """The settings of the command being run."""
    meta = click.get_current_context().meta
    if _SETTINGS not in meta:
        meta[_SETTINGS] = Settings()
    return meta[_SETTINGS]  # type: ignore[no-any-return]


def _store(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is None or value is False:
            return  # not given here: keep what an earlier position (or the environment) says
        if _SETTINGS not in ctx.meta:
            ctx.meta[_SETTINGS] = Settings()
        setattr(ctx.meta[_SETTINGS], name, value)

    return callback


def global_options(f: F) -> F:
    """--address/--server, --token, --tls-root-cert/--tls-ca, --json: before or after the command."""
    options = [
        click.option(
            "--address",
            "--server",
            metavar="HOST:PORT",
            expose_value=False,
            callback=_store("address"),
            help=f"Server address (env PALETTA_ADDRESS)  [default: {c.DEFAULT_ADDRESS}]",
        ),
        click.option(
            "--token",
            metavar="TOKEN",
            expose_value=False,
            callback=_store("token"),
            help="Bearer token; for `serve`, the token every call must bring (env PALETTA_TOKEN)",
        ),
        click.option(
            "--tls-root-cert",
            "--tls-ca",
            metavar="PEM",
            expose_value=False,
            callback=_store("tls_root_cert"),
            help="CA certificate to connect with TLS (env PALETTA_TLS_ROOT_CERT)",
        ),
        click.option(
            "--json",
            "json_",
            is_flag=True,
            default=False,
            expose_value=False,
            callback=_store("json"),
            help="Machine-readable output: JSON lines of job events, or one JSON document",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


# -- parameter types ------------------------------------------------------------------------------


class ImageArg(click.ParamType):  # type: ignore[type-arg,unused-ignore]  # generic from click 8.2
    """An image input: an existing file, or an asset name "assets/…" already on the server."""

    name = "IMAGE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if text.startswith("assets/"):
            return text
        path = Path(text)
        if not path.is_file():
            self.fail(f"{text!r} is not a file (nor an asset name assets/…)", param, ctx)
        if not os.access(path, os.R_OK):
            self.fail(f"{text!r} is not readable", param, ctx)
        return text


class OutputArg(click.ParamType):  # type: ignore[type-arg,unused-ignore]
    """An output file, checked writable before anything is submitted."""

    name = "FILE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        path = Path(value)
        problem = out.check_output_path(path)
        if problem:
            self.fail(problem, param, ctx)
        return path


IMAGE = ImageArg()
OUTPUT = OutputArg()


def _choice(*values: str) -> click.Choice[str]:
    return click.Choice(values, case_sensitive=False)


PRIORITIES = _choice("low", "normal", "high")
UPSCALERS = _choice("lanczos", "realesrgan")


# -- option sets ----------------------------------------------------------------------------------


def _apply(f: F, options: list[Callable[[F], F]]) -> F:
    for option in reversed(options):
        f = option(f)
    return f


def job_options(f: F) -> F:
    """--priority, --request-id, --cancel-on-disconnect, --no-progress (every capability)."""
    return _apply(
        f,
        [
            click.option(
                "--priority",
                type=PRIORITIES,
                show_default="the capability's (high for short jobs, else normal)",
                help="Queue priority.",
            ),
            click.option(
                "--request-id",
                metavar="KEY",
                help="Idempotency key, at most 128 characters: repeating it re-attaches to the same job.",
            ),
            click.option(
                "--cancel-on-disconnect",
                is_flag=True,
                help="Let the server cancel the job when this client disconnects (killed, network lost); "
                "by default the job goes on. Ctrl-C always cancels it.",
            ),
            click.option("--no-progress", is_flag=True, help="Show no progress on stderr."),
        ],
    )


def output_option(required: bool, help_text: str) -> Callable[[F], F]:
    return click.option("-o", "--output", type=OUTPUT, required=required, help=help_text)


def diffusion_options(guidance: str, steps_default: str = "the model's") -> Callable[[F], F]:
    """-o, --steps, --seed, --variants, --guidance for the FLUX / Qwen capabilities."""

    def decorate(f: F) -> F:
        return _apply(
            f,
            [
                output_option(True, "Output image (.png keeps the parameters chunk; .jpg, .webp convert); "
                              "variants add -1, -2 …"),
                click.option("--steps", type=click.IntRange(1, 100), show_default=steps_default,
                             help="Denoising steps."),
                click.option("--seed", type=int, show_default="random", help="Seed of the first variant; "
                             "variant i uses seed + i."),
                click.option("--variants", type=click.IntRange(1, 8), show_default="1", help="Number of images."),
                click.option("--guidance", type=float, show_default=guidance.split(";")[0],
                             help=f"Guidance scale, {guidance.split(';')[-1].strip()}."),
            ],
        )

    return decorate


def style_options(f: F) -> F:
    return click.option(
        "--style",
        "styles",
        multiple=True,
        metavar="NAME[:WEIGHT]",
        help="Style LoRA (see `paletta styles`), weight in [0, 2] (default: the style's); repeat to stack.",
    )(f)


def image_prompt_options(f: F) -> F:
    return _apply(
        f,
        [
            click.option("--image-prompt", type=IMAGE, help="IP-Adapter reference image (file or assets/…)."),
            click.option("--image-prompt-weight", type=click.FloatRange(0, 2), show_default="0.7",
                         help="IP-Adapter strength."),
        ],
    )


def upscaler_option(f: F) -> F:
    return click.option(
        "--upscaler", type=UPSCALERS, show_default="lanczos",
        help="How the output is restored to the input image's size.",
    )(f)


def upscale_with_option(f: F) -> F:
    """``upscale``'s own --upscaler: the model that enlarges (Real-ESRGAN unless told otherwise)."""
    return click.option(
        "--upscaler", type=UPSCALERS, show_default="realesrgan",
        help="What enlarges the image: Real-ESRGAN x4 (tiled), or LANCZOS resampling.",
    )(f)


def sdk_job_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The SDK keyword arguments of the job options (removed from ``kwargs``)."""
    return {
        "priority": kwargs.pop("priority", None),
        "request_id": kwargs.pop("request_id", None),
        "cancel_on_disconnect": kwargs.pop("cancel_on_disconnect", False),
    }


# -- following a job ------------------------------------------------------------------------------


class Interrupted(Exception):
    """Ctrl-C while following a job (after it was cancelled)."""


@contextmanager
def _cancel_on_interrupt(client: Client, job: JobHandle[Any]) -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        if job.name:
            try:
                client.cancel_job(job.name)
                print(f"paletta: cancelled {job.name}", file=sys.stderr)
            except PalettaError as err:
                print(f"paletta: could not cancel {job.name}: {err}", file=sys.stderr)
        raise Interrupted() from None


def follow_job(
    submit: Callable[[Client], JobHandle[Any]],
    *,
    output: Path | None,
    no_progress: bool,
    context: out.JobContext | None = None,
    show_result: Callable[[job_pb2.JobOutput], None] | None = None,
) -> int:
    """Submit a job and follow it to its end.

    Image outputs (and masks) are downloaded next to ``output`` as they are stored (paths printed
    on stdout); typed results go to ``show_result``. With --json, stdout carries one JSON line
    per event instead. Ctrl-C cancels the job and exits 130.
    """
    s = settings()
    client = s.client()
    context = context or out.JobContext()
    json_mode = s.json
    view = out.ProgressView(context, enabled=not (no_progress or json_mode))

    def on_progress(p: Any) -> None:
        if json_mode:
            if p.preview is None:
                out.emit_json(progress_dict_with_job(p))
        else:
            view.update(p)

    def progress_dict_with_job(p: Any) -> dict[str, Any]:
        return {**out.progress_dict(p), "job": job.name}

    job = submit(client)  # a rejected request raises InvalidArgument here
    if not json_mode:
        print(job.name, file=sys.stderr, flush=True)
    written: list[str] = []
    with view, _cancel_on_interrupt(client, job):
        for o in job.outputs(on_progress=on_progress):
            path: Path | None = None
            if output is not None and o.asset.name:
                path = out.output_path(output, len(written))
                out.write_output(client.download(o.asset.name), path)
                written.append(str(path))
            result = result_of(o)
            if json_mode:
                event: dict[str, Any] = {"event": "output", "job": job.name, "index": o.index}
                if o.asset.name:
                    event["asset"] = o.asset.name
                if o.seed:
                    event["seed"] = o.seed
                if path is not None:
                    event["file"] = str(path)
                if result is not None:
                    event["result"] = out.result_dict(result)
                out.emit_json(event)
            else:
                if path is not None:
                    print(path, flush=True)
                if show_result is not None:
                    show_result(o)
    final = job.wait()
    if json_mode:
        out.emit_json(
            {
                "event": "finished",
                "job": final.name,
                "state": out.state_name(final),
                "capability": final.capability,
                "files": written,
            }
        )
    return EXIT_OK
