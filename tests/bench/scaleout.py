"""Scale-out figures (not a timed test): ``python -m tests.bench.scaleout [--jobs 200 --cost-ms 50]``.

On a throwaway PostgreSQL cluster (tests/pg.py), with N real ``paletta worker`` processes whose
``generate`` capability is replaced by a fixed-cost job (it sleeps ``cost`` in 5 steps, reporting
progress, and emits one output without an image). So a 2-core box measures the queue, the claims
and the events, not CPU contention between workers. The bench process is the front end: a shared
mode JobManager submitting and following jobs through LISTEN/NOTIFY, as ``paletta serve --workers 0``.

Prints:
  (a) jobs per second with 1, 2 and 4 workers (ideal: workers / cost)
  (b) queue claim latency — the queued event's time to the started event's time, idle workers — p50/p99
  (c) event latency across processes — a worker's progress event's time to its arrival in a
      front end's watch — p50/p99 (target ≤ 20 ms)
  (d) 500 jobs with 4 workers, one killed with -9 halfway: none lost, none run twice
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
STEPS = 5
LEASE_S = 2.0


# -- the worker side (a subprocess) ----------------------------------------------------------------
def _sleep_run(cost_s: float):  # noqa: ANN202
    def run(request, ctx) -> None:  # noqa: ANN001
        for step in range(STEPS):
            time.sleep(cost_s / STEPS)
            ctx.check_cancelled()
            ctx.progress(step + 1, STEPS, "denoising")
        ctx.emit_output(None, parameters={"bench": True}, seed=request.seed)
    return run


def run_worker(database: str, data: str, cost_ms: float) -> None:
    import paletta_server.app as app_module
    from paletta_server.capabilities import discover
    from paletta_server.config import load_config
    from paletta_server.main import worker

    capabilities = discover()
    capabilities["generate"] = dataclasses.replace(capabilities["generate"], run=_sleep_run(cost_ms / 1000),
                                                   models=lambda request, profile: [])
    app_module.discover = lambda: capabilities
    worker(load_config(Path(data), env={}, profile="tiny", database=database, device="cpu", lease_seconds=LEASE_S))


# -- the front end side (this process) --------------------------------------------------------------
class Bench:
    def __init__(self, cluster, data: Path, cost_ms: float):  # noqa: ANN001
        self.cluster, self.data, self.cost_ms = cluster, data, cost_ms
        self.workers: list[subprocess.Popen] = []

    def start(self, workers: int) -> None:
        from paletta_server.jobs.manager import JobManager
        from paletta_server.jobs.store import JobStore
        from paletta_server.storage import AssetStore

        self.database = self.cluster.new_database()
        self.store = JobStore(self.database)
        self.manager = JobManager(self.store, AssetStore(self.data / "assets", 1 << 20, 1 << 20), max_queue=10_000,
                                  lookahead=4, max_skips=3, lease_seconds=LEASE_S)
        self.manager.start(asyncio.get_running_loop())
        self.workers = []
        for i in range(workers):
            log = (self.data / f"worker{i}.log").open("w")
            self.workers.append(subprocess.Popen(
                [sys.executable, "-m", "tests.bench.scaleout", "--worker", self.database, str(self.data),
                 "--cost-ms", str(self.cost_ms)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("server", "client", ""))}))
        for i in range(workers):
            path = self.data / f"worker{i}.log"
            while "ready" not in path.read_text(errors="replace"):
                if self.workers[i].poll() is not None:
                    raise SystemExit(path.read_text())
                time.sleep(0.1)

    async def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            proc.wait(30)
        await asyncio.to_thread(self.manager.stop)
        self.store.dispose()

    def submit(self, seed: int) -> str:
        from paletta.v1 import generate_pb2, job_spec_pb2

        spec = job_spec_pb2.JobSpec(generate=generate_pb2.GenerateRequest(prompt="bench", seed=seed))
        return self.manager.submit("generate", spec.SerializeToString(), 2, "", "", False)[0]

    async def follow(self, job_id: str, latencies: list[float] | None = None) -> list:
        events = []
        async for event in self.manager.watch(job_id):
            if latencies is not None and event.HasField("progress"):
                latencies.append(time.time() - event.time.ToDatetime(tzinfo=UTC).timestamp())
            events.append(event)
        return events


def _ms(values: list[float], q: float) -> float:
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(q * len(values)))]


async def throughput(bench: Bench, workers: int, jobs: int) -> float:
    bench.start(workers)
    try:
        began = time.monotonic()
        ids = [bench.submit(i) for i in range(jobs)]
        await asyncio.gather(*(bench.follow(job_id) for job_id in ids))
        return jobs / (time.monotonic() - began)
    finally:
        await bench.stop()


async def latencies(bench: Bench, jobs: int) -> tuple[list[float], list[float]]:
    """Idle workers; one job at a time, so each claim is a fresh wake-up by NOTIFY."""
    bench.start(2)
    claims: list[float] = []
    events: list[float] = []
    try:
        for i in range(jobs):
            job_id = bench.submit(i)
            followed = await bench.follow(job_id, events)
            times = {e.WhichOneof("kind"): e.time.ToDatetime().timestamp() for e in followed}
            claims.append(times["started"] - times["queued"])
            await asyncio.sleep(0.01)
        return claims, events
    finally:
        await bench.stop()


async def kill_halfway(bench: Bench, jobs: int) -> dict:
    from paletta.v1 import job_pb2

    bench.start(4)
    try:
        ids = [bench.submit(i) for i in range(jobs)]
        done = 0
        finals: dict[str, int] = {}

        async def one(job_id: str) -> None:
            nonlocal done
            events = await bench.follow(job_id)
            finals[job_id] = events[-1].finished.job.state
            done += 1
            if done == jobs // 2:
                bench.workers[0].send_signal(signal.SIGKILL)

        await asyncio.gather(*(one(job_id) for job_id in ids))
        started = {job_id: sum(1 for d in bench.store.events_after(job_id, 0)
                               if job_pb2.JobEvent.FromString(d).HasField("started")) for job_id in ids}
        outputs = {job_id: len(bench.store.outputs(job_id)) for job_id in ids}
        return {
            "finished": len(finals),
            "succeeded": sum(1 for s in finals.values() if s == job_pb2.JOB_STATE_SUCCEEDED),
            "interrupted": sum(1 for s in finals.values() if s == job_pb2.JOB_STATE_FAILED),
            "other": sum(1 for s in finals.values() if s not in (job_pb2.JOB_STATE_SUCCEEDED,
                                                                  job_pb2.JOB_STATE_FAILED)),
            "started_twice": sum(1 for n in started.values() if n > 1),
            "outputs_twice": sum(1 for n in outputs.values() if n > 1),
        }
    finally:
        await bench.stop()


async def main(args: argparse.Namespace) -> None:
    from tests.pg import throwaway_cluster

    print(f"scale-out bench: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{datetime.now(UTC):%Y-%m-%d}; fixed-cost job {args.cost_ms:.0f} ms in {STEPS} steps", flush=True)
    with throwaway_cluster() as cluster, tempfile.TemporaryDirectory() as tmp:
        bench = Bench(cluster, Path(tmp), args.cost_ms)
        print("(a) throughput", flush=True)
        for workers in (1, 2, 4):
            rate = await throughput(bench, workers, args.jobs)
            ideal = workers * 1000 / args.cost_ms
            print(f"    {workers} worker(s): {rate:6.1f} jobs/s  (ideal {ideal:.0f}, {100 * rate / ideal:.0f}%)",
                  flush=True)
        claims, events = await latencies(bench, args.latency_jobs)
        print(f"(b) claim latency, {len(claims)} jobs: p50 {_ms(claims, 0.5):.1f} ms, p99 {_ms(claims, 0.99):.1f} ms")
        print(f"(c) event latency across processes, {len(events)} events: p50 {_ms(events, 0.5):.1f} ms, "
              f"p99 {_ms(events, 0.99):.1f} ms (target <= 20 ms)", flush=True)
        result = await kill_halfway(bench, args.kill_jobs)
        print(f"(d) {args.kill_jobs} jobs, 4 workers, one killed -9 halfway: {result}")
        ok = (result["finished"] == args.kill_jobs and result["other"] == 0 and result["interrupted"] <= 1
              and result["started_twice"] == 0 and result["outputs_twice"] == 0)
        print(f"    none lost, none run twice: {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="jobs per throughput run")
    parser.add_argument("--cost-ms", type=float, default=50.0, help="the fixed-cost job's duration")
    parser.add_argument("--latency-jobs", type=int, default=100)
    parser.add_argument("--kill-jobs", type=int, default=500)
    parser.add_argument("--worker", nargs=2, metavar=("DATABASE", "DATA"), help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.worker:
        run_worker(parsed.worker[0], parsed.worker[1], parsed.cost_ms)
    else:
        asyncio.run(main(parsed))
