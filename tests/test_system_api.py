"""SystemService, StyleService, health, reflection, bearer-token auth and TLS."""

import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from paletta.v1 import generate_pb2 as gen
from paletta.v1 import generate_service_pb2_grpc as gen_grpc
from paletta.v1 import job_pb2, style_service_pb2, style_service_pb2_grpc
from paletta.v1 import system_service_pb2 as sys_pb
from paletta.v1 import system_service_pb2_grpc as sys_grpc
from paletta_server.config import load_config
from paletta_server.server import BindError, PalettaServer
from tests.helpers import collect, error_reason, field_violations

QUICK = dict(prompt="q", width=64, height=64, steps=1, seed=1)


async def test_status_reports_profile_device_and_loaded_models(server):
    system = sys_grpc.SystemServiceStub(server.channel)
    before = await system.GetStatus(sys_pb.GetStatusRequest())
    assert before.profile == "tiny" and before.device == "cpu" and before.quantization == "fp32"
    assert before.version and before.memory_budget_bytes > 0 and not before.loaded_models
    assert not before.HasField("gpu")
    await collect(gen_grpc.GenerateServiceStub(server.channel).Generate(gen.GenerateRequest(**QUICK)))
    after = await system.GetStatus(sys_pb.GetStatusRequest())
    loaded = {m.key: m for m in after.loaded_models}
    assert set(loaded) == {"flux-schnell"} and loaded["flux-schnell"].bytes > 100_000
    assert after.memory_used_bytes == loaded["flux-schnell"].bytes and after.queue_length == 0


async def test_watch_status_streams_snapshots(server):
    system = sys_grpc.SystemServiceStub(server.channel)
    stream = system.WatchStatus(sys_pb.WatchStatusRequest(interval_ms=100))
    snapshots = [await stream.read() for _ in range(3)]
    stream.cancel()
    assert all(s.profile == "tiny" for s in snapshots)


async def test_list_and_unload_models(server):
    system = sys_grpc.SystemServiceStub(server.channel)
    models = await system.ListModels(sys_pb.ListModelsRequest())
    keys = [m.key for m in models.models]
    assert keys == sorted(keys) and "flux-schnell" in keys and "realesrgan-x4plus" in keys
    schnell = next(m for m in models.models if m.key == "flux-schnell")
    assert schnell.env_var == "PALETTA_MODEL_FLUX_SCHNELL" and "generate" in schnell.capabilities
    await collect(gen_grpc.GenerateServiceStub(server.channel).Generate(gen.GenerateRequest(**QUICK)))
    reply = await system.UnloadModels(sys_pb.UnloadModelsRequest())
    assert list(reply.unloaded) == ["flux-schnell"] and reply.freed_bytes > 0
    assert not (await system.GetStatus(sys_pb.GetStatusRequest())).loaded_models
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await system.UnloadModels(sys_pb.UnloadModelsRequest(keys=["flux-schnell", "no-such-model"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "keys[1]" in field_violations(err.value)


async def test_styles_listed(server):
    styles = await style_service_pb2_grpc.StyleServiceStub(server.channel).ListStyles(
        style_service_pb2.ListStylesRequest())
    by_name = {s.name: s for s in styles.styles}
    assert list(by_name) == sorted(["realism", "koda", "tarot", "ghibsky", "anime"])
    assert by_name["tarot"].trigger_word == "in the style of TOK a trtcrd tarot style"
    assert by_name["ghibsky"].trigger_word == "GHIBSKY style" and by_name["realism"].trigger_word == ""


async def test_health_per_service_and_reflection(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "paletta.v1.GenerateService", "paletta.v1.JobService", "paletta.v1.AssetService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    call = reflect.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    names = {s.name for s in reply.list_services_response.service}
    assert {"paletta.v1.GenerateService", "paletta.v1.SystemService", "grpc.health.v1.Health"} <= names


async def test_bearer_token(server_factory):
    handle = await server_factory(token="s3cret")
    system = sys_grpc.SystemServiceStub(handle.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await system.GetStatus(sys_pb.GetStatusRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await system.GetStatus(sys_pb.GetStatusRequest(), metadata=[("authorization", "Bearer wrong")])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(gen_grpc.GenerateServiceStub(handle.channel).Generate(gen.GenerateRequest(**QUICK)))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for wrong in ("s3cret", "Basic s3cret", "Bearer S3CRET", "Bearer s3cret-and-more"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await system.GetStatus(sys_pb.GetStatusRequest(), metadata=[("authorization", wrong)])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, wrong
    for right in ("Bearer s3cret", "bearer s3cret", "BEARER  s3cret"):  # the scheme is case-insensitive
        ok = await system.GetStatus(sys_pb.GetStatusRequest(), metadata=[("authorization", right)])
        assert ok.profile == "tiny"
    health = await health_pb2_grpc.HealthStub(handle.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_tls(server_factory, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
                    "-out", str(cert), "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    handle = await server_factory(tls_cert=cert, tls_key=key)
    creds = grpc.ssl_channel_credentials(cert.read_bytes())
    async with grpc.aio.secure_channel(handle.address, creds) as channel:
        events = await collect(gen_grpc.GenerateServiceStub(channel).Generate(gen.GenerateRequest(**QUICK)))
    assert events[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED
    with pytest.raises(grpc.aio.AioRpcError):
        await sys_grpc.SystemServiceStub(handle.channel).GetStatus(sys_pb.GetStatusRequest(), timeout=2)
    # Half a TLS setup is refused, not served in plaintext; a key given as the certificate names TLS.
    with pytest.raises(ValueError, match="TLS needs both --tls-cert and --tls-key"):
        load_config(tmp_path / "half", env={}, tls_cert=cert)
    swapped = PalettaServer(load_config(tmp_path / "swapped", env={}, host="127.0.0.1", port=0, profile="tiny",
                                        tls_cert=key, tls_key=cert))
    with pytest.raises(BindError, match="with TLS: check that --tls-cert is a PEM certificate chain"):
        await swapped.start()


async def test_missing_model_fails_fast_with_failed_precondition(server_factory):
    handle = await server_factory(profile="quality")
    events = await collect(gen_grpc.GenerateServiceStub(handle.channel).Generate(gen.GenerateRequest(**QUICK)))
    job = events[-1].finished.job
    assert job.state == job_pb2.JOB_STATE_FAILED
    assert job.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "flux-schnell" in job.error.message and "PALETTA_MODEL_FLUX_SCHNELL" in job.error.message
    assert (job.end_time.ToDatetime() - job.start_time.ToDatetime()).total_seconds() < 30
    # The server goes on serving.
    status = await sys_grpc.SystemServiceStub(handle.channel).GetStatus(sys_pb.GetStatusRequest())
    assert status.profile == "quality" and "CPU" in status.quantization


async def test_error_reason_on_rpc_errors(server):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(gen_grpc.GenerateServiceStub(server.channel).Generate(gen.GenerateRequest(prompt="")))
    assert error_reason(err.value) == "INVALID_ARGUMENT"


async def test_eviction_shows_in_job_events_and_status(server_factory):
    # A budget smaller than two tiny models: loading the second evicts the first.
    handle = await server_factory(cpu_memory_budget_bytes=1_000_000)
    await collect(gen_grpc.GenerateServiceStub(handle.channel).Generate(gen.GenerateRequest(**QUICK)))
    from paletta.v1 import inpaint_pb2, inpaint_service_pb2_grpc
    from tests.helpers import png_bytes, upload

    image = (await upload(handle.channel, png_bytes((64, 64)))).name
    events = await collect(inpaint_service_pb2_grpc.InpaintServiceStub(handle.channel).Outpaint(
        inpaint_pb2.OutpaintRequest(image={"asset": image}, left=16, steps=1, seed=1)))
    stages = [(e.progress.stage, e.progress.model, e.progress.step) for e in events if e.HasField("progress")
              and e.progress.stage in ("loading", "evicting")]
    # Tiny models have no size estimate, so room is made once flux-fill's bytes are measured.
    assert stages == [("loading", "flux-fill", 0), ("evicting", "flux-schnell", 0),
                      ("evicting", "flux-schnell", 1), ("loading", "flux-fill", 1)]
    status = await sys_grpc.SystemServiceStub(handle.channel).GetStatus(sys_pb.GetStatusRequest())
    assert [m.key for m in status.loaded_models] == ["flux-fill"] and list(status.evicted_models) == ["flux-schnell"]
    assert status.loading_model == "" and status.memory_budget_bytes == 1_000_000

