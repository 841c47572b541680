"""Hardening (issue 8): seeds, malformed requests, rich statuses everywhere, one server per port,
nothing written outside the data dir, crash leftovers, the server's own pixel limit, the start-up
and shutdown lines."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from paletta.v1 import background_pb2 as bg
from paletta.v1 import background_service_pb2_grpc as bg_grpc
from paletta.v1 import edit_pb2 as edit_pb
from paletta.v1 import edit_service_pb2_grpc as edit_grpc
from paletta.v1 import generate_pb2 as gen
from paletta.v1 import generate_service_pb2_grpc as gen_grpc
from paletta.v1 import image_pb2, job_pb2
from paletta.v1 import system_service_pb2 as sys_pb
from paletta.v1 import system_service_pb2_grpc as sys_grpc
from tests.conftest import link_tiny_models
from tests.helpers import collect, error_reason, field_violations, png_bytes, upload

MAX_SEED = 2**63 - 1
QUICK = dict(prompt="a knight", width=64, height=64, steps=1)
REPO = Path(__file__).resolve().parents[1]
PALETTA = str(REPO / ".venv" / "bin" / "paletta") if (REPO / ".venv" / "bin" / "paletta").exists() else "paletta"


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def finished(events: list[job_pb2.JobEvent]) -> job_pb2.Job:
    return events[-1].finished.job


# -- 1. seeds --------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed, variants", [(MAX_SEED, 2), (MAX_SEED - 6, 8), (-1, 1), (-(2**63), 1)])
async def test_generate_refuses_seeds_whose_variants_leave_int64(server, seed, variants):
    stub = gen_grpc.GenerateServiceStub(server.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.Generate(gen.GenerateRequest(**QUICK, seed=seed, variants=variants)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    description = field_violations(err.value)["seed"]
    assert f"[0, {2**63 - variants}]" in description, description
    assert error_info(err.value).domain == "paletta"


async def test_generate_accepts_the_largest_seed_for_its_variants(server):
    stub = gen_grpc.GenerateServiceStub(server.channel)
    events = await collect(stub.Generate(gen.GenerateRequest(**QUICK, seed=MAX_SEED - 1, variants=2)))
    assert finished(events).state == job_pb2.JOB_STATE_SUCCEEDED, finished(events).error.message
    assert [e.output.seed for e in events if e.HasField("output")] == [MAX_SEED - 1, MAX_SEED]


async def test_edit_refuses_an_overflowing_seed(server, tiny_image_bytes):
    stub = edit_grpc.EditServiceStub(server.channel)
    request = edit_pb.EditRequest(image=image_pb2.ImageRef(inline=tiny_image_bytes), prompt="make it blue",
                                  steps=1, seed=MAX_SEED, variants=2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.Edit(request))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"[0, {2**63 - 2}]" in field_violations(err.value)["seed"]
    request.seed = MAX_SEED - 1
    events = await collect(stub.Edit(request))
    assert finished(events).state == job_pb2.JOB_STATE_SUCCEEDED, finished(events).error.message


# -- 2. requests that do not parse -----------------------------------------------------------------

def raw_prompt(payload: bytes) -> bytes:
    """A GenerateRequest by hand: field 1 (prompt), wire type 2, so no client can fix the bytes."""
    return b"\x0a" + bytes([len(payload)]) + payload


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"\xed\xa0\x80", b"ok \xc3"])
async def test_bad_utf8_is_malformed_request_logged_in_one_line(server, caplog, payload):
    caplog.set_level("INFO")
    generate = server.channel.unary_stream("/paletta.v1.GenerateService/Generate")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(generate(raw_prompt(payload)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(err.value)
    assert (info.reason, info.domain) == ("MALFORMED_REQUEST", "paletta")
    assert "paletta.v1.GenerateRequest" in err.value.details()
    lines = [r for r in caplog.records if "MALFORMED_REQUEST" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0].getMessage(), [r.getMessage() for r in lines]
    assert "/paletta.v1.GenerateService/Generate" in lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a client's bad bytes"
    # The server goes on serving.
    events = await collect(gen_grpc.GenerateServiceStub(server.channel).Generate(gen.GenerateRequest(**QUICK, seed=1)))
    assert finished(events).state == job_pb2.JOB_STATE_SUCCEEDED


async def test_malformed_unary_and_client_streaming_requests(server):
    unload = server.channel.unary_unary("/paletta.v1.SystemService/UnloadModels")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unload(b"\x0a\x02\xff\xfe")  # keys[0] with bad UTF-8
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(err.value) == "MALFORMED_REQUEST"
    # An upload whose second chunk is cut short (declares 5 bytes, carries 2).
    upload_raw = server.channel.stream_unary("/paletta.v1.AssetService/UploadAsset")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload_raw(iter([b"\x0a\x02ab", b"\x0a\x05ab"]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(err.value) == "MALFORMED_REQUEST"


# -- 4. every refusal carries ErrorInfo ------------------------------------------------------------

async def test_unauthenticated_carries_error_info(server_factory):
    handle = await server_factory(token="s3cret")
    status = sys_grpc.SystemServiceStub(handle.channel)
    for metadata in (None, [("authorization", "Bearer wrong")]):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await status.GetStatus(sys_pb.GetStatusRequest(), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = error_info(err.value)
        assert (info.reason, info.domain) == ("UNAUTHENTICATED", "paletta")
    # A client-streaming call is refused without the server waiting for its messages.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(handle.channel, png_bytes())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and error_reason(err.value) == "UNAUTHENTICATED"


@pytest.mark.parametrize("method", ["/paletta.v1.NoSuchService/Nothing", "/paletta.v1.GenerateService/Nothing"])
async def test_unknown_methods_are_unimplemented_with_error_info(server, method):
    calls = (lambda: server.channel.unary_unary(method)(b""), lambda: collect(server.channel.unary_stream(method)(b"")))
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call()
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        info = error_info(err.value)
        assert (info.reason, info.domain) == ("UNIMPLEMENTED", "paletta") and method in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await server.channel.stream_unary(method)(iter([b"", b""]))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and error_reason(err.value) == "UNIMPLEMENTED"


async def test_unexpected_server_error_is_internal_with_error_info(server, caplog):
    def broken() -> int:
        raise ZeroDivisionError("a bug")

    server.app.manager.queue_length = broken
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sys_grpc.SystemServiceStub(server.channel).GetStatus(sys_pb.GetStatusRequest())
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert (error_info(err.value).reason, error_info(err.value).domain) == ("INTERNAL", "paletta")
    assert "a bug" not in err.value.details(), "internals stay in the server's log"
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records)


async def test_message_over_the_transport_limit_is_refused_by_grpc(server):
    # The transport refuses it before any Paletta code runs, so this one status has no ErrorInfo
    # (the README says so); inline images under the limit but over max_upload_bytes do get one.
    from paletta_server.server import MESSAGE_LIMIT

    generate = server.channel.unary_stream("/paletta.v1.GenerateService/Generate")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(generate(b"\x0a" + b"\xff" * 16 + b"\x7f" + b"x" * (MESSAGE_LIMIT + 1)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(err.value) is None


# -- paletta serve as a subprocess (items 5, 6, 9, 10) ---------------------------------------------

class Served:
    """A ``paletta serve`` subprocess whose merged stdout/stderr is collected by a thread."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str | None] | None = None):
        import threading

        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PALETTA_")}
        for name, value in (env or {}).items():  # None removes a variable
            if value is None:
                full_env.pop(name, None)
            else:
                full_env[name] = value
        self.proc = subprocess.Popen([PALETTA, "serve", "--profile", "tiny", "--data-dir", str(data_dir), *args],
                                     env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} in the output: {self.output()}")

    @property
    def port(self) -> int:
        return int(self.wait_for("paletta: serving on").split()[3].rsplit(":", 1)[1])

    def output(self) -> str:
        self._reader.join(0.5 if self.proc.poll() is not None else 0)
        return "".join(self.lines)

    def stop(self, timeout: float = 30.0) -> tuple[int, float]:
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def served(tmp_path: Path, tiny_models_dir: Path):
    started: list[Served] = []

    def start(*args: str, env: dict[str, str | None] | None = None, data_dir: Path | None = None) -> Served:
        data = data_dir or tmp_path / f"served{len(started)}"
        link_tiny_models(data, tiny_models_dir)
        proc = Served(data, *args, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def test_first_log_line_says_whether_a_token_is_required(served):
    open_server = served("--port", "0")
    port = open_server.port
    first = open_server.lines[0]
    assert f"no token: anyone who can reach 127.0.0.1:{port} may use it" in first, open_server.output()
    guarded = served("--port", "0", env={"PALETTA_TOKEN": "s3cret"})
    guarded.wait_for("paletta: serving on")
    assert "bearer token required" in guarded.lines[0] and "no token" not in guarded.output(), guarded.output()


def generate_sync(port: int, **fields) -> grpc.Future:
    """A Generate on a plain (sync) channel, so the test can stop the server while it streams."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    return gen_grpc.GenerateServiceStub(channel).Generate(gen.GenerateRequest(**fields))


def test_sigterm_while_idle_exits_0_quickly_saying_so(served):
    proc = served("--port", "0")
    # After a job, as in real use: torch and friends are loaded, which made exiting take seconds.
    events = list(generate_sync(proc.port, **QUICK, seed=1))
    assert finished(events).state == job_pb2.JOB_STATE_SUCCEEDED
    code, took = proc.stop()
    assert code == 0, proc.output()
    assert took < 3.0, f"took {took:.2f} s"
    assert "SIGTERM: shutting down" in proc.output()


def test_sigterm_during_a_job_exits_0_and_the_job_is_interrupted(served, tmp_path):
    data = tmp_path / "busy"
    proc = served("--port", "0", data_dir=data)
    stream = generate_sync(proc.port, prompt="a storm", width=1024, height=1024, steps=100, seed=1)
    job = ""
    for event in stream:
        job = event.job
        if event.HasField("progress") and event.progress.stage == "denoising":
            break
    code, took = proc.stop()
    assert code == 0, proc.output()
    assert took < 5.0, f"took {took:.2f} s"
    # The next start records what happened to it.
    again = served("--port", "0", data_dir=data)
    channel = grpc.insecure_channel(f"127.0.0.1:{again.port}")
    from paletta.v1 import job_service_pb2, job_service_pb2_grpc

    got = job_service_pb2_grpc.JobServiceStub(channel).GetJob(job_service_pb2.GetJobRequest(name=job))
    assert got.state == job_pb2.JOB_STATE_FAILED and "stopped" in got.error.message
    # The worker ended it at its next step during the shutdown, not the next start's recovery.
    assert error_reason(got.error) == "INTERRUPTED" and "shut down" in got.error.message


async def test_second_server_on_a_port_in_use_exits_2_naming_it(server, served):
    port = int(server.address.rsplit(":", 1)[1])
    second = served("--port", str(port))
    try:
        code = second.proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a second server started on port {port}: {second.output()}")
    assert code == 2, second.output()
    assert f"port 127.0.0.1:{port} is already in use" in second.output()
    # The first server never noticed.
    status = await sys_grpc.SystemServiceStub(server.channel).GetStatus(sys_pb.GetStatusRequest())
    assert status.profile == "tiny"


async def test_a_name_that_resolves_to_a_taken_address_is_refused_not_half_served(server, served):
    """localhost is 127.0.0.1 and ::1: with 127.0.0.1 taken, grpc alone would serve on ::1 only."""
    port = int(server.address.rsplit(":", 1)[1])
    second = served("--host", "localhost", "--port", str(port))
    try:
        code = second.proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a second server started on localhost:{port}: {second.output()}")
    # probed before grpc binds: grpc alone would serve on ::1 where localhost is both
    assert code == 2 and f"port localhost:{port} is already in use (on 127.0.0.1)" in second.output(), \
        second.output()


async def test_one_embedded_server_per_job_store(server, served, tmp_path):
    from paletta_server.config import load_config
    from paletta_server.server import BindError, PalettaServer

    store = (server.data_dir / "paletta.db").resolve()
    second = served("--port", "0", data_dir=server.data_dir)  # another process on the first one's data dir
    try:
        code = second.proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a second server started on {server.data_dir}: {second.output()}")
    assert code == 2 and f"the job store {store} is in use by another Paletta server" in second.output()
    other_dir = served("--port", "0", "--database", f"sqlite:///{store}")  # its own data dir, the same store
    assert other_dir.proc.wait(30) == 2 and "is in use by another Paletta server" in other_dir.output()
    with pytest.raises(ValueError, match="is in use by another Paletta server"):  # and in this process
        PalettaServer(load_config(server.data_dir, env={}, host="127.0.0.1", port=0, profile="tiny"))
    # The first server's jobs were not touched: it still serves, and once stopped its store is free.
    status = await sys_grpc.SystemServiceStub(server.channel).GetStatus(sys_pb.GetStatusRequest())
    assert status.profile == "tiny"
    await server.server.stop(0.5)
    # A start that fails lets the store go too: the next try in the same process gets it.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = PalettaServer(load_config(server.data_dir, env={}, host="127.0.0.1", port=taken.getsockname()[1],
                                         profile="tiny"))
        with pytest.raises(BindError, match="is already in use"):
            await busy.start()
    again = PalettaServer(load_config(server.data_dir, env={}, host="127.0.0.1", port=0, profile="tiny"))
    await again.start()
    await again.stop(0.5)


async def test_port_in_use_raises_bind_error_in_process(server, tmp_path):
    from paletta_server.config import load_config
    from paletta_server.server import BindError, PalettaServer

    port = int(server.address.rsplit(":", 1)[1])
    second = PalettaServer(load_config(tmp_path / "second", env={}, host="127.0.0.1", port=port, profile="tiny"))
    with pytest.raises(BindError, match=f"port 127.0.0.1:{port} is already in use"):
        await second.start()


# -- 6. nothing written outside the data dir -------------------------------------------------------

def test_process_defaults_point_caches_into_the_data_dir_and_keep_the_users(tmp_path):
    from paletta_server.environment import prepare_process

    env = {"NUMBA_CACHE_DIR": "/mine/numba", "HF_HOME": "/mine/hf"}
    applied = prepare_process(tmp_path, env)
    assert env["NUMBA_CACHE_DIR"] == "/mine/numba" and "NUMBA_CACHE_DIR" not in applied
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "torchinductor")
    assert env["ORT_DISABLE_TELEMETRY"] == "1" and env["TQDM_DISABLE"] == "1"
    # The model cache and what moves it stay the user's.
    assert env["HF_HOME"] == "/mine/hf" and not {"HF_HUB_CACHE", "XDG_CACHE_HOME"} & set(applied)
    assert prepare_process(tmp_path, fresh := {})["NUMBA_CACHE_DIR"] == str(tmp_path / "cache" / "numba")
    assert fresh["NUMBA_CACHE_DIR"] == str(tmp_path / "cache" / "numba")


@pytest.mark.slow
@pytest.mark.rembg
def test_serving_writes_nothing_in_home_or_tmpdir(served, tmp_path, tiny_image_bytes):
    from paletta_server.environment import process_defaults

    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env: dict[str, str | None] = {"HOME": str(home), "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1"}
    # What the server sets must come from the server, not from this test's environment; numba's
    # cache stays the session's (a cache the user chose), or rembg's first import compiles again.
    stripped = (set(process_defaults(tmp_path)) - {"NUMBA_CACHE_DIR"}) | {"XDG_CACHE_HOME", "XDG_CONFIG_HOME"}
    env.update(dict.fromkeys(stripped))
    proc = served("--port", "0", env=env)
    events = list(generate_sync(proc.port, **QUICK, seed=1))
    assert finished(events).state == job_pb2.JOB_STATE_SUCCEEDED
    channel = grpc.insecure_channel(f"127.0.0.1:{proc.port}")
    events = list(bg_grpc.BackgroundServiceStub(channel).RemoveBackground(bg.RemoveBackgroundRequest(
        image=image_pb2.ImageRef(inline=tiny_image_bytes), return_mask=True)))
    assert finished(events).state == job_pb2.JOB_STATE_SUCCEEDED, finished(events).error.message
    code, _ = proc.stop()
    assert code == 0, proc.output()
    left = sorted(str(p.relative_to(tmp_path)) for p in [*home.rglob("*"), *tmp.rglob("*")])
    assert left == [], f"written outside the data dir: {left}"
    # Nor do libraries print progress bars into the server's log.
    assert "it/s]" not in proc.output() and "Loading" not in proc.output(), proc.output()


# -- 7. crash leftovers ----------------------------------------------------------------------------

def test_start_up_removes_sidecars_without_their_asset(tmp_path):
    from paletta_server.storage import AssetStore

    store = AssetStore(tmp_path, max_bytes=1 << 20, max_pixels=1 << 20)
    kept = store.put_image_bytes(png_bytes((8, 8)))
    kept_path = store.path(kept.name)
    # A kill -9 between the sidecar and the asset leaves the sidecar, and maybe the asset's temp file.
    digest = "ab" + "0" * 62
    (tmp_path / "ab").mkdir(exist_ok=True)
    orphan = tmp_path / "ab" / f"{digest}.json"
    orphan.write_text(json.dumps({"name": f"assets/{digest}", "mime": "image/png", "width": 1, "height": 1,
                                  "size_bytes": 1}))
    partial = tmp_path / "ab" / ".tmp-x1y2"
    partial.write_bytes(b"\x89PNG")

    reopened = AssetStore(tmp_path, max_bytes=1 << 20, max_pixels=1 << 20)
    assert not orphan.exists() and not partial.exists()
    assert reopened.get(kept.name) == kept and kept_path.with_suffix(".json").exists()
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted([kept_path.relative_to(tmp_path).as_posix(),
                           kept_path.with_suffix(".json").relative_to(tmp_path).as_posix()])


def test_an_asset_that_lost_its_sidecar_is_whole_again_when_stored_again(tmp_path):
    from paletta_server.storage import AssetStore

    store = AssetStore(tmp_path, max_bytes=1 << 20, max_pixels=1 << 20)
    data = png_bytes((8, 8))
    info = store.put_image_bytes(data)
    store.path(info.name).with_suffix(".json").unlink()
    assert store.put_image_bytes(data) == info
    assert store.get(info.name) == info


# -- 8. the server's own pixel limit ---------------------------------------------------------------

def png_of_zeros(width: int, height: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def test_default_pixel_limit_is_40_megapixels_and_configurable(tmp_path):
    from paletta_server.config import load_config

    assert load_config(tmp_path, env={}).max_image_pixels == 40_000_000
    assert load_config(tmp_path, env={"PALETTA_MAX_IMAGE_PIXELS": "1000"}).max_image_pixels == 1000
    (tmp_path / "paletta.toml").write_text("max_image_pixels = 2000\n")
    assert load_config(tmp_path, env={}).max_image_pixels == 2000


async def test_64_megapixel_png_is_refused_from_its_header_quoting_the_servers_limit(server):
    data = png_of_zeros(8192, 8192)
    assert len(data) < 256 * 1024  # a few hundred KiB on the wire, 192 MiB once decoded
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(server.channel, data)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    description = field_violations(err.value)["data"]
    assert "8192x8192" in description and "40000000" in description, description
    assert error_reason(err.value) == "INVALID_ARGUMENT"
    # A header past Pillow's own bomb limit (178956970 pixels) gets the same answer, not Pillow's.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(server.channel, png_of_zeros(20000, 20000, "1"))
    description = field_violations(err.value)["data"]
    assert "40000000" in description and "178956970" not in description, description
    # Inline images too, named by their field.
    edit = edit_grpc.EditServiceStub(server.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(edit.Edit(edit_pb.EditRequest(image=image_pb2.ImageRef(inline=data), prompt="x")))
    assert "40000000" in field_violations(err.value)["image.inline"]


async def test_configured_pixel_limit_is_enforced_to_the_pixel_and_reported(server_factory):
    handle = await server_factory(max_image_pixels=100 * 100)
    assert (await upload(handle.channel, png_of_zeros(100, 100))).width == 100
    for size in ((101, 100), (100, 101)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await upload(handle.channel, png_of_zeros(*size))
        assert "limit of 10000 pixels" in field_violations(err.value)["data"]
    jpeg = io.BytesIO()
    Image.new("RGB", (120, 90)).save(jpeg, format="JPEG")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(handle.channel, jpeg.getvalue())
    assert "120x90 (10800 pixels)" in field_violations(err.value)["data"]
    status = await sys_grpc.SystemServiceStub(handle.channel).GetStatus(sys_pb.GetStatusRequest())
    assert status.max_image_pixels == 10000


# -- 10. a quiet log -------------------------------------------------------------------------------

def test_library_warnings_are_logged_once_per_text(caplog):
    import logging
    import warnings

    from paletta_server.environment import quiet_warnings

    def library_call(step: int) -> None:
        warnings.warn("`foo` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn(f"step {step} is odd", FutureWarning, stacklevel=1) if step % 2 else None

    with warnings.catch_warnings():
        # As after any library's own catch_warnings(), which resets the per-call-site registry
        # that the "default" action relies on: without quiet_warnings every call prints again.
        warnings.simplefilter("always")
        quiet_warnings()
        try:
            with caplog.at_level(logging.WARNING, logger="py.warnings"):
                for step in range(6):  # six jobs calling the same library code
                    library_call(step)
        finally:
            logging.captureWarnings(False)
    texts = [r.getMessage() for r in caplog.records if r.name == "py.warnings"]
    assert sum("`foo` is deprecated" in t for t in texts) == 1, texts
    assert sum("is odd" in t for t in texts) == 3, texts  # different texts each get their line
