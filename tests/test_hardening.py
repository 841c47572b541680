"""Hardening (issue 8): seeds, malformed requests, rich statuses everywhere, one server per port,
nothing written outside the data dir, crash leftovers, the server's own pixel limit, the start-up
and shutdown lines."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from paletta.v1 import edit_service_pb2 as edit_pb
from paletta.v1 import edit_service_pb2_grpc as edit_grpc
from paletta.v1 import generate_service_pb2 as gen
from paletta.v1 import generate_service_pb2_grpc as gen_grpc
from paletta.v1 import image_pb2, job_pb2
from tests.helpers import collect, field_violations

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
