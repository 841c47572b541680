"""The ``paletta`` command: every capability, jobs, status, models, styles, and the server.

Examples::

    paletta generate "a knight" -o knight.png --variants 2 --style tarot:0.8
    paletta --json caption knight.png
    paletta jobs list --state running
    paletta jobs watch jobs/42
    paletta status
    paletta serve --profile tiny --port 50051 --token s3cret

Global options (``--address``/``--server``, ``--token``, ``--tls-root-cert``/``--tls-ca``,
``--json``) go before or after the command. Exit status: 0 ok, 1 the job (or the call) failed,
2 bad usage or an invalid argument (the server's INVALID_ARGUMENT included), 130 interrupted.
``serve`` imports the server lazily; client commands never import it, torch or nicegui.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import click
import grpc
from rich.console import Console
from rich.table import Table

from paletta import _cli_output as out
from paletta import _common as c
from paletta._cli_base import (
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Interrupted,
    global_options,
    settings,
)
from paletta._cli_capabilities import CAPABILITY_COMMANDS
from paletta._cli_output import check_output_path, output_path, write_output
from paletta.errors import InvalidArgument, JobFailed, PalettaError, Unavailable
from paletta.v1 import job_pb2

__all__ = ["EXIT_INTERRUPTED", "EXIT_JOB_FAILED", "EXIT_OK", "EXIT_USAGE", "app", "main"]
__all__ += ["check_output_path", "output_path", "write_output"]

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


def _version() -> str:
    try:
        return metadata.version("paletta")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def exit_code_for(error: PalettaError) -> int:
    """2 for a request the server refused as invalid, 1 for everything else (a failed job included)."""
    if isinstance(error, InvalidArgument) and not isinstance(error, JobFailed):
        return EXIT_USAGE
    return EXIT_JOB_FAILED


def report_error(error: PalettaError) -> int:
    """Tell the user (stderr; with --json also a JSON line on stdout) and return the exit status."""
    s = settings()
    code = exit_code_for(error)
    hint = ""
    if isinstance(error, Unavailable):
        hint = f"cannot reach the Paletta server at {s.server_address}: start it with `paletta serve`"
        print(f"paletta: {hint}", file=sys.stderr)
    else:
        for line in out.error_lines(error):
            print(line, file=sys.stderr)
    if s.json:
        out.emit_json(out.error_dict(error, code, hint))
    return code


class PalettaGroup(click.Group):
    """The command group: turns SDK errors and Ctrl-C into exit statuses, one line each."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PalettaError as err:
            raise click.exceptions.Exit(report_error(err)) from None
        except (Interrupted, KeyboardInterrupt):
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:  # `paletta jobs list | head`
            sys.stderr.close()
            raise click.exceptions.Exit(EXIT_OK) from None
        except grpc.RpcError as err:  # a stream the SDK hands out raw (e.g. watch_status)
            print(f"paletta: {err}", file=sys.stderr)
            raise click.exceptions.Exit(EXIT_JOB_FAILED) from None
        except OSError as err:  # an output file that could not be written after all
            print(f"paletta: {err}", file=sys.stderr)
            raise click.exceptions.Exit(EXIT_JOB_FAILED) from None
        except ValueError as err:  # the SDK refusing an argument before sending it
            print(f"paletta: {err}", file=sys.stderr)
            raise click.exceptions.Exit(EXIT_USAGE) from None


@click.group(
    "paletta", cls=PalettaGroup, context_settings=CONTEXT, epilog="\b\nExample:\n  paletta generate 'a knight' -o k.png"
)
@click.version_option(_version(), "--version", prog_name="paletta", message="%(prog)s %(version)s")
@global_options
def app() -> None:
    """Paletta image workstation: client of a Paletta server, and the server itself (`paletta serve`).

    Global options may also follow the command. Exit status: 0 ok, 1 job failed, 2 bad usage or
    invalid argument, 130 interrupted.
    """


for _command in CAPABILITY_COMMANDS:
    app.add_command(_command)


def _console() -> Console:
    """stdout for tables: wide when it is not a terminal, so names are never cut."""
    return Console(width=None if sys.stdout.isatty() else 240, highlight=False)


def _time(ts: Any) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if ts.seconds else "-"


# -- jobs -----------------------------------------------------------------------------------------


@app.group("jobs", cls=PalettaGroup, context_settings=CONTEXT,
           epilog="\b\nExample:\n  paletta jobs list --state failed")
@global_options
def jobs() -> None:
    """List, show, watch, cancel and approve jobs."""


STATES = click.Choice(["queued", "running", "succeeded", "failed", "cancelled"], case_sensitive=False)


@jobs.command("list", epilog="\b\nExample:\n  paletta jobs list --state running --state queued")
@click.option("--state", "states", type=STATES, multiple=True, help="Only jobs in this state; repeat for several.")
@click.option("--capability", default="", show_default="any", help="Only this capability, e.g. generate.")
@click.option("--limit", type=click.IntRange(1), default=50, help="At most this many jobs.")
@global_options
def jobs_list(states: tuple[str, ...], capability: str, limit: int) -> None:
    """Jobs, newest first."""
    found = settings().client().list_jobs(states=states, capability=capability, limit=limit)
    if settings().json:
        out.emit_json({"jobs": [out.message_dict(j) for j in found]})
        return
    table = Table("NAME", "STATE", "CAPABILITY", "CREATED", "OUTPUTS", box=None)
    for job in found:
        table.add_row(job.name, c.state_label(job.state), job.capability, _time(job.create_time), str(len(job.outputs)))
    _console().print(table)


@jobs.command("get", epilog="\b\nExample:\n  paletta jobs get jobs/42")
@click.argument("name")
@global_options
def jobs_get(name: str) -> None:
    """One job: state, request, outputs."""
    job = settings().client().get_job(name)
    if settings().json:
        out.emit_json(out.message_dict(job))
        return
    print(f"name:       {job.name}\nstate:      {c.state_label(job.state)}\ncapability: {job.capability}")
    print(f"created:    {_time(job.create_time)}\nended:      {_time(job.end_time)}")
    if job.error.message:
        print(f"error:      {job.error.message}")
    spec = job.spec.WhichOneof("spec")
    if spec:
        request = out.message_dict(getattr(job.spec, spec))
        print(f"request:    {spec} {json.dumps(request, ensure_ascii=False)}")
    for o in job.outputs:
        mark = " (approved)" if o.approved else ""
        print(f"output {o.index}:   {o.asset.name or o.WhichOneof('result')} seed={o.seed}{mark}")


def job_context(job: job_pb2.Job) -> out.JobContext:
    """What a job's spec says for labelling its progress: its variants, or its pipeline's steps."""
    kind = job.spec.WhichOneof("spec")
    if kind == "pipeline":
        return out.JobContext(pipeline_steps=[s.WhichOneof("spec") or "?" for s in job.spec.pipeline.steps])
    request = getattr(job.spec, kind) if kind else None
    variants = getattr(request, "variants", 1) if request is not None else 1
    return out.JobContext(variants=variants or 1)


def describe_event(event: job_pb2.JobEvent, progress: Any = None, context: out.JobContext | None = None) -> str:
    """One line per event for ``jobs watch``; progress labelled like the capability commands' lines
    (stage, variant, pipeline step) when its typed ``progress`` is given."""
    kind = event.WhichOneof("kind") or "?"
    text = f"{event.seq:>4} {kind}"
    if kind == "queued":
        text += f" position={event.queued.position}"
    elif kind == "progress" and progress is not None:
        text += " " + out.progress_line(progress, context or out.JobContext())
    elif kind == "progress":
        p = event.progress
        unit = out.STAGE_UNITS.get(p.stage, "")
        text += f" {p.stage} {p.step}/{p.total_steps}" + (f" {unit}" if unit else "")
        text += f" {p.model}" if p.model else ""
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


@jobs.command("watch", epilog="\b\nExample:\n  paletta jobs watch jobs/42 --after-seq 10")
@click.argument("name")
@click.option("--after-seq", type=click.IntRange(0), default=0, help="Replay the events after this seq.")
@global_options
def jobs_watch(name: str, after_seq: int) -> None:
    """Follow a job's events (replaying those after --after-seq) until it ends; exit 1 unless it succeeded."""
    client = settings().client()
    context = job_context(client.get_job(name))
    handle = client.attach(name, after_seq=after_seq)
    for update in handle._updates():  # events with their typed progress, as the SDK reads them
        event = update.event
        if settings().json:  # the raw events, each with its seq (for --after-seq)
            data = {"event": event.WhichOneof("kind"), **out.message_dict(event)}
            data.get("preview", {}).pop("jpeg", None)  # pixels are no use in a log
            out.emit_json(data)
        else:
            print(describe_event(event, update.progress, context), flush=True)
    handle.wait()  # exit 1 if the job failed or was cancelled


@jobs.command("cancel", epilog="\b\nExample:\n  paletta jobs cancel jobs/42")
@click.argument("name")
@global_options
def jobs_cancel(name: str) -> None:
    """Cancel a job: a queued one at once, a running one at its next step."""
    job = settings().client().cancel_job(name)
    if settings().json:
        out.emit_json({"job": job.name, "state": c.state_label(job.state)})
    else:
        print(f"{job.name} {c.state_label(job.state)}")


@jobs.command("approve", epilog="\b\nExample:\n  paletta jobs approve jobs/42 1")
@click.argument("name")
@click.argument("index", type=click.IntRange(0), default=0)
@click.option("--withdraw", is_flag=True, help="Remove the approval instead.")
@global_options
def jobs_approve(name: str, index: int, withdraw: bool) -> None:
    """Mark output INDEX of a finished job as chosen."""
    job = settings().client().approve_output(name, index, approved=not withdraw)
    approved = [o.index for o in job.outputs if o.approved]
    if settings().json:
        out.emit_json({"job": job.name, "index": index, "approved": not withdraw, "approved_outputs": approved})
    else:
        print(f"{job.name} output {index} {'unapproved' if withdraw else 'approved'}")


# -- the server's state ---------------------------------------------------------------------------


@app.command("status", epilog="\b\nExample:\n  paletta --server gpu-box:50051 status")
@global_options
def status() -> None:
    """Server, device, memory, resident models and queue."""
    s = settings().client().status()
    if settings().json:
        out.emit_json(out.message_dict(s))
        return
    print(f"server:       {settings().server_address} (version {s.version})")
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


@app.command("models", epilog="\b\nExample:\n  paletta models")
@global_options
def models() -> None:
    """Every model of the active profile: capabilities, residency, source and its variable."""
    found = settings().client().list_models()
    if settings().json:
        out.emit_json({"models": [out.message_dict(m) for m in found]})
        return
    table = Table("KEY", "CAPABILITIES", "RESIDENT", "SOURCE", "VARIABLE", box=None)
    for m in found:
        where = f"{m.source}@{m.revision}" if m.revision else m.source
        table.add_row(m.key, ",".join(m.capabilities), c.human_bytes(m.bytes) if m.resident else "-", where, m.env_var)
    _console().print(table)


@app.command("styles", epilog="\b\nExample:\n  paletta styles")
@global_options
def styles() -> None:
    """The style LoRAs that --style stacks."""
    found = settings().client().list_styles()
    if settings().json:
        out.emit_json({"styles": [out.message_dict(s) for s in found]})
        return
    table = Table("NAME", "LABEL", "WEIGHT", "TRIGGER", "BEST FOR", box=None)
    for s in found:
        table.add_row(s.name, s.label, f"{s.default_weight:g}", s.trigger_word, s.best_for)
    _console().print(table)


# -- the server -----------------------------------------------------------------------------------


_DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                         show_default="$PALETTA_DATA_DIR or the user data folder", help="Jobs, assets and models.")
_PROFILE = click.option("--profile", type=click.Choice(["fast", "hyper", "quality", "tiny", "turbo"]),
                        show_default="fast (env PALETTA_PROFILE)", help="Model profile.")
_MEMORY_BUDGET = click.option(
    "--memory-budget", metavar="SIZE", show_default="all free memory (env PALETTA_MEMORY_BUDGET)",
    help="Cap on model memory, e.g. 16GiB or bytes: plan and fail as a card of that size would.")


def _server_entry(name: str) -> tuple[Callable[..., Any], Callable[[Any], None]]:
    """(load_config, the entry point ``name``) of the installed server.

    Imported here, so that client commands never load the server (nor, through it, anything heavy).
    """
    try:
        from paletta_server import main as server_main  # type: ignore[import-untyped,unused-ignore]
        from paletta_server.config import load_config  # type: ignore[import-untyped,unused-ignore]
    except ImportError as err:
        raise click.ClickException(
            f"the server is not installed ({err.name} is missing): pip install 'paletta[server]'"
        ) from None
    return load_config, getattr(server_main, name)


def _config(load_config: Callable[..., Any], data_dir: Path | None, **values: object) -> Any:
    try:
        return load_config(data_dir, **{k: v for k, v in values.items() if v is not None})
    except ValueError as err:
        raise click.UsageError(str(err)) from None


@app.command("serve", epilog="\b\nExample:\n  paletta serve --profile tiny --port 50051 --token s3cret\n"
                             "  paletta serve --database postgresql+psycopg://paletta@db/paletta --workers 0")
@click.option("--host", show_default="127.0.0.1 (env PALETTA_HOST)", help="Bind address.")
@click.option("--port", type=click.IntRange(0, 65535), show_default="50051 (env PALETTA_PORT)",
              help="Port; 0 picks a free one.")
@_DATA_DIR
@_PROFILE
@_MEMORY_BUDGET
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), help="PEM certificate chain for TLS.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), help="PEM private key for TLS.")
@click.option("--database", metavar="URL", show_default="sqlite in the data dir (env PALETTA_DATABASE)",
              help="Job store: sqlite:///… or postgresql+psycopg://… (shared by front ends and workers).")
@click.option("--workers", type=click.IntRange(0, 1), show_default="1 (env PALETTA_WORKERS)",
              help="Device workers in this process: 1 runs jobs here, 0 is a front end only (PostgreSQL).")
@global_options
def serve(host: str | None, port: int | None, data_dir: Path | None, profile: str | None,
          memory_budget: str | None, tls_cert: Path | None, tls_key: Path | None, database: str | None,
          workers: int | None) -> None:
    """Run the Paletta gRPC server until Ctrl-C; --token (before or after `serve`) requires it on every call."""
    load_config, run = _server_entry("serve")
    run(_config(load_config, data_dir, host=host, port=port, profile=profile, token=settings().token or None,
                tls_cert=tls_cert, tls_key=tls_key, memory_budget=memory_budget, database=database,
                workers=workers))


@app.command("worker", epilog="\b\nExample:\n  paletta worker --database postgresql+psycopg://paletta@db/paletta "
                              "--device cuda:0 --data-dir /shared/paletta")
@click.option("--database", metavar="URL", required=True,
              help="The shared PostgreSQL job store, postgresql+psycopg://… (env PALETTA_DATABASE).",
              envvar="PALETTA_DATABASE")
@click.option("--device", metavar="DEVICE", show_default="the first GPU, else cpu (env PALETTA_DEVICE)",
              help="cpu, cuda or cuda:N: the device this worker owns.")
@_DATA_DIR
@_PROFILE
@_MEMORY_BUDGET
@click.option("--lease-seconds", type=click.FloatRange(1, 3600), show_default="10 (env PALETTA_LEASE_SECONDS)",
              help="A worker silent this long is presumed dead: its running job ends FAILED / INTERRUPTED.")
@global_options
def worker(database: str, device: str | None, data_dir: Path | None, profile: str | None,
           memory_budget: str | None, lease_seconds: float | None) -> None:
    """Run one device worker on a shared PostgreSQL queue until Ctrl-C (one per GPU, any machine)."""
    load_config, run = _server_entry("worker")
    run(_config(load_config, data_dir, database=database, device=device, profile=profile,
                memory_budget=memory_budget, lease_seconds=lease_seconds))


# -- entry point ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``paletta`` command; returns the exit status."""
    try:
        result = app.main(args=list(argv) if argv is not None else None, prog_name="paletta", standalone_mode=False)
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.exceptions.Abort:  # Ctrl-C while Click itself was prompting or parsing
        return EXIT_INTERRUPTED
    except click.exceptions.Exit as err:
        return err.exit_code
    # standalone_mode=False hands back the command's return value, or the exit code of --help/--version.
    return result if isinstance(result, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
