"""Scale-out (issue 13): PostgreSQL job store, `paletta worker` processes, stateless front ends.

Real parts: a throwaway PostgreSQL cluster (tests/pg.py), and real front end and worker
processes (``python -m paletta_server.main serve|worker``) on the tiny profile sharing one data
dir. A worker killed with -9 fails its running job as INTERRUPTED within its lease and its queue
goes to the others; a front end killed with -9 costs its clients a re-attach through another;
a PostgreSQL restart loses no job and runs none twice.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, inspect, text

import paletta
from paletta.v1 import generate_pb2 as gen
from paletta.v1 import generate_service_pb2_grpc as gen_grpc
from paletta.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from paletta_server.jobs.manager import JobManager
from paletta_server.jobs.store import JobStore
from paletta_server.storage import AssetStore
from tests.conftest import link_tiny_models
from tests.helpers import error_reason
from tests.pg import PgCluster, free_port, throwaway_cluster

ROOT = Path(__file__).resolve().parent.parent
SLOW = dict(prompt="slow", width=256, height=256, steps=100, seed=1)
QUICK = dict(prompt="quick", width=64, height=64, steps=1)
LEASE_S = 2.0


# -- the store on its own -------------------------------------------------------------------------
def _columns(url: str) -> dict[str, set[str]]:
    engine = create_engine(url)
    try:
        found = inspect(engine)
        return {table: {c["name"] for c in found.get_columns(table)} for table in ("jobs", "events", "outputs")}
    finally:
        engine.dispose()


def test_migrations_give_both_stores_the_same_schema_and_adopt_a_pre_migration_store(tmp_path, pg_cluster):
    sqlite_url, pg_url = f"sqlite:///{tmp_path / 'a.db'}", pg_cluster.new_database()
    for url in (sqlite_url, pg_url):
        JobStore(url).dispose()
    assert _columns(sqlite_url) == _columns(pg_url)
    assert {"worker", "lease_until", "cancel_requested", "skips"} <= _columns(pg_url)["jobs"]
    # A store made before migrations (today's schema, no alembic_version) keeps its jobs.
    old = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{old}")
    with engine.begin() as conn:
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(ROOT / "server/paletta_server/jobs/migrations"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("INSERT INTO jobs (id, capability, state, priority, spec, model_key, cancel_on_disconnect,"
                          " created, last_seq) VALUES ('a1', 'generate', 'SUCCEEDED', 2, x'', '', 0,"
                          " '2026-01-01 00:00:00', 0)"))
    engine.dispose()
    store = JobStore(old)
    try:
        row = store.get("a1")
        assert row is not None and row.state == "SUCCEEDED" and row.skips == 0 and row.worker is None
    finally:
        store.dispose()


def test_concurrent_claims_take_each_job_once_in_priority_order_preferring_resident_models(tmp_path, pg_cluster):
    store = JobStore(pg_cluster.new_database())
    manager = JobManager(store, AssetStore(tmp_path / "assets", 1 << 20, 1 << 20), max_queue=100, lookahead=4,
                         max_skips=3)
    try:
        low = manager.submit("generate", b"", 1, "", "flux-schnell", False)[0]
        high = manager.submit("generate", b"", 3, "", "flux-schnell", False)[0]
        fill = manager.submit("inpaint", b"", 3, "", "flux-fill", False)[0]
        # The head is `high`; a worker holding flux-fill takes `fill` (same priority, within the look-ahead) …
        assert manager.claim("w-fill", lambda key: key == "flux-fill").job_id == fill
        # … and passing `high` over aged it; a worker with nothing resident takes the head.
        assert store.get(high).skips == 1 and store.get(low).skips == 1
        assert manager.claim("w-none", lambda key: False).job_id == high
        assert manager.claim("w-none", lambda key: False).job_id == low
        assert manager.claim("w-none", lambda key: False) is None
        # Eight workers racing for forty jobs: every job once, none twice.
        ids = {manager.submit("generate", b"", 2, "", "flux-schnell", False)[0] for _ in range(40)}
        taken: list[str] = []

        def drain(worker: str) -> None:
            while (assignment := manager.claim(worker, lambda key: False)) is not None:
                taken.append(assignment.job_id)

        threads = [threading.Thread(target=drain, args=(f"w{i}",)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(taken) == sorted(ids)
        assert {store.get(i).state for i in ids} == {"RUNNING"}
        assert all([e for e in store.events_after(i, 0)].__len__() == 2 for i in ids)  # queued, started
    finally:
        store.dispose()


# -- real processes ---------------------------------------------------------------------------------
class Deployment:
    """Front ends and workers on one PostgreSQL database and one shared data dir."""

    def __init__(self, database: str, data: Path, logs: Path, lease_s: float):
        self.database, self.data, self.logs, self.lease_s = database, data, logs, lease_s
        self.procs: list[subprocess.Popen] = []

    def _start(self, role: str, name: str, **env: str) -> subprocess.Popen:
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PALETTA_DATABASE": self.database,
                       "PALETTA_LEASE_SECONDS": str(self.lease_s), "PALETTA_DEVICE": "cpu",
                       "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("server", "client", "webui", "")), **env}
        log = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "paletta_server.main", role, str(self.data)], env=environment,
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def front_end(self, name: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        proc = self._start("serve", name, PALETTA_PORT=str(port), PALETTA_WORKERS="0")
        address = f"127.0.0.1:{port}"
        wait_serving(address)
        return proc, address

    def worker(self, name: str, wait: bool = True) -> subprocess.Popen:
        proc = self._start("worker", name)
        if wait:
            self.wait_log(name, "ready")
        return proc

    def wait_log(self, name: str, text: str, timeout: float = 90) -> None:
        path = self.logs / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in path.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise AssertionError(f"{name} never logged {text!r}:\n{path.read_text(errors='replace')[-3000:]}")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def wait_serving(address: str, timeout: float = 90) -> None:
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"{address} never became healthy")


@pytest.fixture
def deployment(tmp_path: Path, tiny_models_dir: Path, pg_cluster: PgCluster) -> Iterator[Deployment]:
    data = tmp_path / "shared-data"  # one path on shared storage for every process
    link_tiny_models(data, tiny_models_dir)
    deploy = Deployment(pg_cluster.new_database(), data, tmp_path, LEASE_S)
    yield deploy
    deploy.close()


def jobs_at(address: str) -> tuple[grpc.Channel, job_service_pb2_grpc.JobServiceStub, gen_grpc.GenerateServiceStub]:
    channel = grpc.insecure_channel(address)
    return channel, job_service_pb2_grpc.JobServiceStub(channel), gen_grpc.GenerateServiceStub(channel)


def wait_job(jobs, name: str, done, timeout: float = 60) -> job_pb2.Job:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = jobs.GetJob(job_service_pb2.GetJobRequest(name=name))
        if done(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"{name} never got there: {job}")


def until_denoising(jobs, name: str) -> None:  # noqa: ANN001
    """Follow a job until its device is past its first denoising step."""
    stream = jobs.WatchJob(job_service_pb2.WatchJobRequest(name=name))
    for event in stream:
        if event.HasField("progress") and event.progress.stage == "denoising":
            stream.cancel()
            return
    raise AssertionError(f"{name} ended before denoising")


def history(jobs, name: str) -> list[job_pb2.JobEvent]:  # noqa: ANN001
    """A job's whole event log, replayed: gap-free, one `started`, one `finished` at the end."""
    events = list(jobs.WatchJob(job_service_pb2.WatchJobRequest(name=name)))
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), name
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds.count("started") <= 1 and kinds.count("finished") == 1 and kinds[-1] == "finished", kinds
    return events


def running_worker_pid(database: str, job_id: str) -> int:
    store = JobStore(database)
    try:
        row = store.get(job_id)
        assert row is not None and row.worker, row
        return int(row.worker.split(":")[1])
    finally:
        store.dispose()


def test_killed_worker_and_killed_front_end_lose_nothing(deployment: Deployment):
    fe_a, address_a = deployment.front_end("fe-a")
    _, address_b = deployment.front_end("fe-b")
    workers = {p.pid: p for p in (deployment.worker("w1"),)}
    channel_a, jobs_a, gen_a = jobs_at(address_a)
    channel_b, jobs_b, gen_b = jobs_at(address_b)
    try:
        # A first job through A, watched through B (the worker builds its tiny models here).
        warm = gen_a.Generate(gen.GenerateRequest(**QUICK, seed=0))
        name = next(warm).job
        assert history(jobs_b, name)[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED
        w2 = deployment.worker("w2")
        workers[w2.pid] = w2
        # Two at once: each idle worker claims one, so both have their models loaded.
        warm = [next(gen_a.Generate(gen.GenerateRequest(**{**QUICK, "steps": 8, "seed": i}))).job for i in (1, 2)]
        for job in warm:
            assert history(jobs_b, job)[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED

        # Two long jobs, one per worker; then a queue behind them, submitted through the other front end.
        slow = [next(gen_a.Generate(gen.GenerateRequest(**{**SLOW, "seed": i}))).job for i in (1, 2)]
        for job in slow:
            until_denoising(jobs_b, job)
        queued = [next(gen_b.Generate(gen.GenerateRequest(**QUICK, seed=10 + i))).job for i in range(6)]

        # kill -9 the worker of the first: its job fails INTERRUPTED within the lease …
        victim = running_worker_pid(deployment.database, slow[0][5:])
        workers[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        # … while a cancel through B reaches the other worker's job at its next step.
        jobs_b.CancelJob(job_service_pb2.CancelJobRequest(name=slow[1]))
        cancelled = history(jobs_a, slow[1])
        assert cancelled[-1].finished.job.state == job_pb2.JOB_STATE_CANCELLED
        assert max(e.progress.step for e in cancelled if e.HasField("progress")) < 100
        failed = wait_job(jobs_b, slow[0], lambda j: j.state != job_pb2.JOB_STATE_RUNNING, timeout=LEASE_S + 10)
        assert time.monotonic() - killed_at <= LEASE_S + 2.5
        assert failed.state == job_pb2.JOB_STATE_FAILED and error_reason(failed.error) == "INTERRUPTED"

        # The queue went to the surviving worker: every job ran once.
        for job in queued:
            events = history(jobs_a, job)
            assert events[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED
            assert [e.WhichOneof("kind") for e in events].count("started") == 1
            assert len(events[-1].finished.job.outputs) == 1

        # A front end killed mid-job: the SDK re-attaches by job name through the other one.
        with paletta.Client(f"ipv4:{address_a},{address_b}", reconnect_timeout=30) as client:
            handle = client.generate("re-attach", width=128, height=128, steps=40, seed=5)
            seen = []
            for update in handle.progress():
                seen.append(update.step)
                if len(seen) == 3:
                    fe_a.send_signal(signal.SIGKILL)
            job = handle.wait()
            assert job.state == job_pb2.JOB_STATE_SUCCEEDED and handle.reattach_count >= 1
            assert fe_a.wait(5) == -signal.SIGKILL
            events = history(jobs_b, job.name)
            assert [e.WhichOneof("kind") for e in events].count("output") == 1
            assert len(client.download(job.outputs[0].asset.name)) == job.outputs[0].asset.size_bytes

        # The surviving worker stops on SIGTERM and says so.
        survivor = next(pid for pid in workers if pid != victim)
        workers[survivor].send_signal(signal.SIGTERM)
        assert workers[survivor].wait(15) == 0
        log_name = "w2" if survivor == w2.pid else "w1"
        log = (deployment.logs / f"{log_name}.log").read_text(errors="replace")
        worker_name = re.search(r"paletta: worker (\S+) ready", log)[1]  # type: ignore[index]
        deployment.wait_log(log_name, f"SIGTERM: worker {worker_name} shutting down")
        deployment.wait_log(log_name, f"worker {worker_name} stopped")
    finally:
        channel_a.close()
        channel_b.close()


def test_postgres_restart_loses_no_job_and_runs_none_twice(tmp_path: Path, tiny_models_dir: Path):
    data = tmp_path / "data"
    link_tiny_models(data, tiny_models_dir)
    with throwaway_cluster() as cluster:
        deploy = Deployment(cluster.new_database(), data, tmp_path, lease_s=10.0)
        try:
            _, address = deploy.front_end("fe")
            deploy.worker("w")
            channel, jobs, generate = jobs_at(address)
            names = [next(generate.Generate(gen.GenerateRequest(prompt="p", width=256, height=256, steps=30,
                                                                seed=i))).job for i in range(4)]
            until_denoising(jobs, names[0])
            watchers = [jobs.WatchJob(job_service_pb2.WatchJobRequest(name=n)) for n in names]  # follow through it
            cluster.restart(down_s=1.0)
            followed = [list(w) for w in watchers]
            # The worker's events hit the outage mid-job, and were written once it was over.
            assert "database unreachable recording" in (tmp_path / "w.log").read_text()
            for name, events in zip(names, followed, strict=True):
                assert [e.seq for e in events] == list(range(1, len(events) + 1))
                assert events[-1].finished.job.state == job_pb2.JOB_STATE_SUCCEEDED, events[-1]
                assert [e.WhichOneof("kind") for e in history(jobs, name)].count("started") == 1
            channel.close()
        finally:
            deploy.close()
