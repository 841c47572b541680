"""Memory budget (issue 14): size parsing and config, the pure planner (evict / offload / refuse), the
derived inference edge and two-family rule, and the mechanism end to end on tiny models with a small cap."""

from __future__ import annotations

import io
import json

import grpc
import pytest
from google.rpc import error_details_pb2
from PIL import Image

from paletta.v1 import edit_pb2 as edit_pb
from paletta.v1 import edit_service_pb2_grpc as edit_grpc
from paletta.v1 import generate_pb2 as gen
from paletta.v1 import generate_service_pb2_grpc as gen_grpc
from paletta.v1 import image_pb2, job_pb2
from paletta.v1 import qwen_edit_pb2 as qwen_pb
from paletta.v1 import qwen_edit_service_pb2_grpc as qwen_grpc
from paletta.v1 import system_service_pb2 as sys_pb
from paletta.v1 import system_service_pb2_grpc as sys_grpc
from paletta_server.config import load_config, parse_size
from paletta_server.models import memory
from paletta_server.models.device import budget_function, device_capacity
from paletta_server.models.memory import GB, Footprint, derive_policy, estimate, plan
from paletta_server.models.types import Device
from tests.helpers import collect, error_info

GiB = 1024**3
MB = 10**6
CAP_16 = 16 * GiB - 256 * 1024**2  # what a 16 GiB cap leaves for planning on CUDA


# -- sizes and config ------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("16GiB", 16 * GiB), ("16GB", 16 * 10**9), ("1.5GiB", int(1.5 * GiB)), ("512 MiB", 512 * 1024**2),
    ("17179869184", 17179869184), ("16gib", 16 * GiB), ("0", 0), (1024, 1024), ("2T", 2 * 10**12),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "16 GiBs", "-1GB", "sixteen", "1.2.3GB"])
def test_parse_size_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_memory_budget_from_env_toml_and_flags(tmp_path):
    assert load_config(tmp_path, env={}).memory_budget == 0
    assert load_config(tmp_path, env={"PALETTA_MEMORY_BUDGET": "16GiB"}).memory_budget == 16 * GiB
    (tmp_path / "paletta.toml").write_text('memory_budget = "12GB"\n')
    assert load_config(tmp_path, env={}).memory_budget == 12 * 10**9
    assert load_config(tmp_path, env={"PALETTA_MEMORY_BUDGET": "1GiB"}).memory_budget == GiB
    assert load_config(tmp_path, env={}, memory_budget="1.5GiB").memory_budget == int(1.5 * GiB)
    with pytest.raises(ValueError, match="not a size"):
        load_config(tmp_path, env={"PALETTA_MEMORY_BUDGET": "lots"})


def test_cap_drives_the_cpu_budget_and_capacity():
    cpu = Device("cpu", "fp32")
    assert budget_function(cpu, 16 * GiB, 2 * GiB)(0) == 16 * GiB
    assert budget_function(cpu, 16 * GiB, 2 * GiB, cap=3 * GiB)(123) == 3 * GiB
    assert device_capacity(cpu, 16 * GiB, 2 * GiB, cap=3 * GiB) == 3 * GiB
    assert device_capacity(Device("cuda", "nf4"), 16 * GiB, 2 * GiB, cap=16 * GiB) == CAP_16


def test_uncapped_cuda_budget_counts_the_allocators_cached_blocks_as_free(monkeypatch):
    """CUDA reports blocks torch keeps cached (a finished job's activations) as used; they are ours."""
    import torch

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (5 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 14 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 11 * GiB)
    budget = budget_function(Device("cuda", "nf4"), 16 * GiB, 2 * GiB)
    assert budget(10 * GiB) == 5 * GiB + 3 * GiB + 10 * GiB - 2 * GiB


class FakeNvml:
    """NVML on a machine with two GPUs: 0 an 80 GB Ampere, 1 a 16 GiB Ada (NVML sees both whatever
    CUDA_VISIBLE_DEVICES says)."""

    gpus = {0: ("GPU-aaaa", (8, 0), 80 * GB), 1: ("GPU-bbbb", (8, 9), 16 * GiB)}

    def nvmlDeviceGetHandleByIndex(self, index):  # noqa: N802 (NVML's names)
        if index not in self.gpus:
            raise LookupError(index)
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid):  # noqa: N802
        return next(i for i, (u, _, _) in self.gpus.items() if u == uuid)

    def nvmlDeviceGetCudaComputeCapability(self, handle):  # noqa: N802
        return self.gpus[handle][1]

    def nvmlDeviceGetMemoryInfo(self, handle):  # noqa: N802
        return type("Memory", (), {"total": self.gpus[handle][2]})


@pytest.mark.parametrize(("visible", "capacity", "turbo"), [
    (None, 80 * GB - 2 * GiB, "bf16"),  # unset: GPU 0
    ("1", 14 * GiB, "float8"),  # `--device cuda:1` sets it so: NVML must look at GPU 1, not 0
    ("1,0", 14 * GiB, "float8"),
    ("GPU-bbbb", 14 * GiB, "float8"),
    ("", 0, None),  # hides every GPU: the CPU
    ("-1", 0, None),
    ("7", 0, None),  # a GPU that is not there
])
def test_the_gpu_nvml_describes_is_the_one_cuda_visible_devices_names(monkeypatch, visible, capacity, turbo):
    from paletta_server.models import device as device_module
    from paletta_server.models.profiles import PROFILES

    monkeypatch.setattr(device_module, "_nvml", FakeNvml)
    monkeypatch.setattr(device_module, "_has_torchao", lambda: True)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    device = device_module.detect_device(PROFILES["turbo"])
    assert (device.name, device.quantization if device.name == "cuda" else None) == (
        ("cuda", turbo) if turbo else ("cpu", None))
    assert device_capacity(Device("cuda", "nf4"), 16 * GiB, 2 * GiB) == capacity


# -- the planner -----------------------------------------------------------------------------------
def fam(weights_mb: int, offload_mb: int = 0, working_mb: int = 0) -> Footprint:
    return Footprint(weights_mb * MB, offload_mb * MB, working_mb * MB, family=True)


def test_fits_whole_without_evicting():
    p = plan(100 * MB, [("helper", 10 * MB, False)], set(), "a", fam(60, working_mb=20))
    assert (p.evict, p.offload, p.refuse, p.needed) == ((), False, "", 80 * MB)


def test_other_families_are_evicted_before_older_helpers():
    resident = [("helper", 10 * MB, False), ("famA", 40 * MB, True), ("famB", 30 * MB, True)]  # LRU first
    p = plan(100 * MB, resident, set(), "new", fam(50))
    assert p.evict == ("famA",) and not p.offload  # 10 + 30 + 50 fits once famA is gone
    p = plan(100 * MB, resident, set(), "new", fam(95))
    assert p.evict == ("famA", "famB", "helper")
    # Not a family: plain LRU after the families (which are still evicted first).
    p = plan(100 * MB, resident, set(), "small", Footprint(25 * MB))
    assert p.evict == ("famA",)


def test_one_family_at_a_time_when_two_do_not_fit():
    resident = [("famA", 10 * MB, True), ("helper", 5 * MB, False)]
    assert plan(100 * MB, resident, set(), "famB", fam(10), keep_two_families=True).evict == ()
    assert plan(100 * MB, resident, set(), "famB", fam(10), keep_two_families=False).evict == ("famA",)
    # a helper never evicts families for the rule
    assert plan(100 * MB, resident, set(), "h2", Footprint(MB), keep_two_families=False).evict == ()


def test_pinned_models_stay_and_a_refusal_evicts_nothing():
    resident = [("famA", 40 * MB, True), ("ip", 30 * MB, False)]
    p = plan(100 * MB, resident, {"ip"}, "control", fam(60))
    assert p.evict == ("famA",) and not p.refuse
    p = plan(100 * MB, resident, {"ip", "famA"}, "control", fam(60))
    assert p.refuse and p.evict == () and "held by models the job also uses" in p.refuse
    assert "control needs 60000000 bytes" in p.refuse and "budget is 100000000 bytes" in p.refuse


def test_offload_only_when_evicting_everything_is_not_enough():
    resident = [("famA", 40 * MB, True)]
    # whole (90 + 10) fits after evicting famA: no offload
    p = plan(100 * MB, resident, set(), "qwen", fam(90, offload_mb=50, working_mb=10))
    assert p.evict == ("famA",) and not p.offload
    # whole (120) never fits; offloaded (60 + 10) fits next to famA: famA stays
    p = plan(120 * MB, resident, set(), "qwen", fam(120, offload_mb=60, working_mb=10))
    assert p.offload and p.evict == () and p.needed == 70 * MB
    # offloaded fits only once famA is gone
    p = plan(100 * MB, resident, set(), "qwen", fam(120, offload_mb=60, working_mb=10))
    assert p.offload and p.evict == ("famA",)
    # neither: refused, naming the model and the bytes
    p = plan(60 * MB, resident, set(), "qwen", fam(120, offload_mb=60, working_mb=10))
    assert p.refuse.startswith("qwen needs 70000000 bytes") and "offloaded" in p.refuse and p.evict == ()


def test_working_memory_scales_with_the_inference_edge():
    f = fam(10, working_mb=40)
    assert f.working_at(1024) == 40 * MB and f.working_at(512) == 10 * MB
    assert plan(40 * MB, [], set(), "a", f, edge=512).refuse == ""
    assert plan(40 * MB, [], set(), "a", f, edge=1024).refuse


def test_every_capability_fits_a_16_gib_card_under_nf4():
    """With the measured / computed NF4 sizes every diffusion family runs under a 16 GiB cap at 1024²:
    FLUX families and the NF4 ControlNet whole, Qwen-Image-Edit offloaded."""
    for key in ("flux-schnell", "flux-kontext", "flux-fill", "flux-controlnet-union"):
        p = plan(CAP_16, [], set(), key, estimate(key, "nf4"))
        assert not p.refuse and not p.offload, (key, p)
    p = plan(CAP_16, [("flux-schnell", estimate("flux-schnell", "nf4").weights, True)], set(), "qwen-image-edit",
             estimate("qwen-image-edit", "nf4"), keep_two_families=False)
    assert p.offload and p.evict == ("flux-schnell",) and not p.refuse
    # bf16 FLUX does not fit a 16 GB card at all, even offloaded
    assert plan(CAP_16, [], set(), "flux-schnell", estimate("flux-schnell", "bf16")).refuse
    assert estimate("flux-schnell", "fp32").weights == 2 * estimate("flux-schnell", "bf16").weights
    assert estimate("realesrgan-x4plus", "nf4", 70).weights == 70


def test_identity_runs_whole_on_a_16_gib_card_under_nf4_beside_its_pinned_helpers():
    """Identity loads antelopev2, BiSeNet, PuLID and EVA first (pinned: the job uses them; 2.37 GB by the
    registry's estimates), then flux-dev-pipeline, a FLUX family with the FLUX NF4 footprint. Under a
    16 GiB cap at 1024² it runs whole: 2.37 + 10.5 + 3.9 working = 16.77 GB of 16.91, an earlier family
    evicted first. The margin is thin (estimates, not GPU measurements): a quarter GiB less and it runs
    offloaded (7.2 transformer + 3.9 working beside the helpers); at 12.5 GiB it is refused."""
    from paletta_server.models.registry import SPECS

    helpers = ("antelopev2", "facexlib-parsing", "pulid-flux", "eva02-clip-l-336")
    sizes = {s.key: s.estimated_bytes for s in SPECS if s.key in helpers}
    resident = [(k, sizes[k], False) for k in helpers]
    dev = estimate("flux-dev-pipeline", "nf4")
    assert "flux-dev-pipeline" in memory.FAMILY_KEYS and dev == estimate("flux-schnell", "nf4")
    policy = derive_policy(CAP_16, [estimate(k, "nf4") for k in memory.EDGE_FAMILIES], 1024)
    assert policy == memory.Policy(1024, False)

    def identity(cap: int, before: tuple = ()) -> memory.Plan:
        return plan(cap, [*before, *resident], set(helpers), "flux-dev-pipeline", dev, policy.inference_edge,
                    policy.keep_two_families)

    p = identity(CAP_16)
    assert (p.evict, p.offload, p.refuse, p.needed) == ((), False, "", int(14.4 * GB))
    assert p.kept == sum(sizes.values()) and 0 < CAP_16 - p.needed - p.kept < 200 * MB
    schnell = ("flux-schnell", estimate("flux-schnell", "nf4").weights, True)
    p = identity(CAP_16, (schnell,))
    assert (p.evict, p.offload, p.refuse) == (("flux-schnell",), False, "")
    p = identity(CAP_16 - GiB // 4)
    assert (p.evict, p.offload, p.refuse, p.needed) == ((), True, "", int(11.1 * GB))
    p = identity(int(12.5 * GiB))
    assert p.refuse.startswith("flux-dev-pipeline needs 11100000000 bytes on the device (offloaded")
    assert "held by models the job also uses" in p.refuse and p.evict == ()


def test_under_hyper_the_acceleration_lora_is_planned_with_its_size(tmp_path):
    """The Hyper-SD LoRA (1.39 GB) is resolved before its pipeline, resident as its file with the file's
    size, and pinned by the job: under a 16 GiB cap identity then runs offloaded, not whole (it had
    0.14 GB to spare) — instead of a CUDA out-of-memory error when the LoRA goes into the pipeline."""
    from paletta_server.engines.common import measure_bytes
    from paletta_server.models.registry import SPECS

    lora = tmp_path / "Hyper-FLUX.1-dev-8steps-lora.safetensors"
    lora.write_bytes(b"\0" * 12345)
    assert measure_bytes(lora) == 12345 and measure_bytes(tmp_path / "absent.safetensors") == 0
    sizes = {s.key: s.estimated_bytes for s in SPECS}
    assert sizes["hyper-sd"] >= 1.39e9  # the released file
    keys = ("antelopev2", "facexlib-parsing", "pulid-flux", "eva02-clip-l-336", "hyper-sd")
    p = plan(CAP_16, [(k, sizes[k], False) for k in keys], set(keys), "flux-dev-pipeline",
             estimate("flux-dev-pipeline", "nf4"), 1024, False)
    assert (p.offload, p.refuse, p.evict) == (True, "", ())


def test_inference_edge_and_two_families_derive_from_the_budget():
    nf4 = [estimate(k, "nf4") for k in memory.EDGE_FAMILIES]
    bf16 = [estimate(k, "bf16") for k in memory.EDGE_FAMILIES]
    assert derive_policy(CAP_16, nf4, 1024) == memory.Policy(1024, False)
    assert derive_policy(78 * GiB, nf4, 1024) == memory.Policy(1024, True)
    assert derive_policy(12 * GiB, nf4, 1024) == memory.Policy(1024, False)  # offloaded
    assert derive_policy(8 * GiB, nf4, 1024).inference_edge == 512
    assert derive_policy(78 * GiB, bf16, 1024) == memory.Policy(1024, True)
    assert derive_policy(60 * GiB, bf16, 1024) == memory.Policy(1024, False)
    assert derive_policy(CAP_16, bf16, 1024) == memory.Policy(512, False)  # the seed's quality limit
    assert derive_policy(int(26 * GB), bf16, 1024).inference_edge == 768  # offloaded, 23.8 + 3.0 * 0.5625
    assert derive_policy(CAP_16, [Footprint(0)], 512) == memory.Policy(512, True)  # tiny: unknown sizes


# -- end to end on tiny models ---------------------------------------------------------------------
def png(size=(64, 64)) -> image_pb2.ImageRef:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 80, 40)).save(buf, format="PNG")
    return image_pb2.ImageRef(inline=buf.getvalue())


async def status_of(handle) -> sys_pb.GetStatusResponse:
    return await sys_grpc.SystemServiceStub(handle.channel).GetStatus(sys_pb.GetStatusRequest())


def progress(events, stage: str) -> list[tuple[str, int]]:
    return [(e.progress.model, e.progress.step) for e in events
            if e.WhichOneof("kind") == "progress" and e.progress.stage == stage]


async def test_a_model_that_cannot_fit_fails_with_memory_budget(server_factory):
    """Tiny Qwen-Image-Edit is 3.5 MB (2.7 MB offloaded): a 1 MiB cap refuses it, before and after a load."""
    handle = await server_factory(memory_budget="1MiB")
    status = await status_of(handle)
    assert status.memory_cap_bytes == 1024**2 and status.memory_budget_bytes == 1024**2
    assert status.inference_edge == status.max_edge == 512 and status.keep_two_families
    stub = qwen_grpc.QwenEditServiceStub(handle.channel)
    for _ in range(2):  # the first is refused after measuring, the second before loading
        events = await collect(stub.Edit(qwen_pb.QwenEditServiceEditRequest(image=png(), prompt="x", steps=1)))
        job = events[-1].finished.job
        assert job.state == job_pb2.JOB_STATE_FAILED
        assert job.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        info = error_info(job.error)
        assert info.reason == "MEMORY_BUDGET" and info.metadata["model"] == "qwen-image-edit"
        assert int(info.metadata["needed_bytes"]) > 1024**2 == int(info.metadata["budget_bytes"])
        assert "qwen-image-edit" in job.error.message and "memory cap 1.0 MiB" in job.error.message
        assert "Traceback" not in job.error.message
    status = await status_of(handle)
    assert not status.loaded_models  # nothing left behind
    # A model that fits still runs.
    events = await collect(gen_grpc.GenerateServiceStub(handle.channel).Generate(
        gen.GenerateRequest(prompt="x", width=64, height=64, steps=1)))
    assert events[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED


async def test_a_budget_for_one_family_evicts_the_other_first(server_factory):
    """Tiny schnell (0.69 MB) and Kontext (0.73 MB) do not fit 1 MiB together: Kontext evicts schnell."""
    handle = await server_factory(memory_budget="1MiB")
    await collect(gen_grpc.GenerateServiceStub(handle.channel).Generate(
        gen.GenerateRequest(prompt="x", width=64, height=64, steps=1)))
    events = await collect(edit_grpc.EditServiceStub(handle.channel).Edit(
        edit_pb.EditRequest(image=png(), prompt="x", steps=1)))
    assert events[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert progress(events, "evicting") == [("flux-schnell", 0), ("flux-schnell", 1)]
    assert not progress(events, "offloading")
    status = await status_of(handle)
    assert [m.key for m in status.loaded_models] == ["flux-kontext"] and status.evicted_models == ["flux-schnell"]


async def test_offload_when_text_encoders_push_over_the_budget(server_factory):
    """Tiny schnell is 0.69 MB whole, 0.29 MB offloaded (its largest component at a time): under a
    0.5 MB cap it runs offloaded, and the job's progress says so; an uncapped server never offloads."""
    handle = await server_factory(memory_budget=500_000)
    events = await collect(gen_grpc.GenerateServiceStub(handle.channel).Generate(
        gen.GenerateRequest(prompt="x", width=64, height=64, steps=1)))
    assert events[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert progress(events, "offloading") == [("flux-schnell", 0), ("flux-schnell", 1)]
    status = await status_of(handle)
    assert list(status.offloaded_models) == ["flux-schnell"]
    assert 0 < status.loaded_models[0].bytes < 500_000 and json.loads(
        [e for e in events if e.WhichOneof("kind") == "output"][0].output.parameters)["model"] == "flux-schnell"
    # The next job finds it resident: no loading, no offloading events.
    events = await collect(gen_grpc.GenerateServiceStub(handle.channel).Generate(
        gen.GenerateRequest(prompt="y", width=64, height=64, steps=1)))
    assert not progress(events, "offloading") and not progress(events, "loading")

    plain = await server_factory()
    events = await collect(gen_grpc.GenerateServiceStub(plain.channel).Generate(
        gen.GenerateRequest(prompt="x", width=64, height=64, steps=1)))
    assert not progress(events, "offloading")
    status = await status_of(plain)
    assert status.memory_cap_bytes == 0 and not status.offloaded_models


def test_out_of_memory_fails_the_job_and_unloads_once_its_activations_are_gone():
    """A CUDA out-of-memory error ends the job RESOURCE_EXHAUSTED / OUT_OF_MEMORY and the models are
    unloaded for a clean next job, after the exception (whose traceback holds the job's frames and
    their activations) has been let go, or their memory could not be returned."""
    import weakref

    import torch

    from paletta.v1 import job_spec_pb2
    from paletta_server.jobs import messages as msg
    from paletta_server.jobs.runner import DeviceWorker

    class Activations:
        pass

    held: list[weakref.ref] = []
    gone_at_unload: list[bool] = []

    class Capability:
        def request_of(self, spec):
            return spec

        def models(self, request, profile):
            return ["flux-schnell"]

        def run(self, request, context):
            activations = Activations()
            held.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    class Residency:
        device = None
        pinned: set[str] = set()

        def pin(self, keys):
            self.pinned = set(keys)

        def unload(self):
            gone_at_unload.append(held[0]() is None and not self.pinned)
            return [], 0

    sent: list = []
    link = type("Link", (), {"send": lambda self, m: sent.append(m)})()
    worker = DeviceWorker(link, {"generate": Capability()}, Residency(), None, None, None, None)
    worker.run(msg.Assignment("j1", "generate", job_spec_pb2.JobSpec().SerializeToString()))
    assert gone_at_unload == [True]
    finished = sent[-1]
    assert isinstance(finished, msg.Finished) and finished.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    info = error_details_pb2.ErrorInfo()
    assert finished.error.details[0].Unpack(info) and info.reason == "OUT_OF_MEMORY"
