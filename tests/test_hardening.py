"""Hardening (issue 8): seeds, malformed requests, rich statuses everywhere, one server per port,
nothing written outside the data dir, crash leftovers, the server's own pixel limit, the start-up
and shutdown lines."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from paletta.v1 import edit_pb2 as edit_pb
from paletta.v1 import edit_service_pb2_grpc as edit_grpc
from paletta.v1 import generate_pb2 as gen
from paletta.v1 import generate_service_pb2_grpc as gen_grpc
from paletta.v1 import image_pb2, job_pb2
from paletta.v1 import system_service_pb2 as sys_pb
from paletta.v1 import system_service_pb2_grpc as sys_grpc
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
