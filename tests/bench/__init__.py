"""Benchmarks: ``python -m tests.bench`` prints figures; nothing here is a timed test.

A "direct" call (an engine called without the server around it) is timed on the server's own
device thread, between jobs, with ``on_device``: a torch call from any other thread starts a
second OpenMP thread pool, and with more OpenMP threads than cores libgomp stops spinning between
parallel regions, which slows the direct call and every later job alike (by ~40 % on a 2-core VM);
a server calls torch from its device thread only.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any


class NullSink:
    """A ProgressSink that drops everything: what a direct engine call reports to."""

    def progress(self, step, total, stage):
        pass

    def preview(self, image, step):
        pass

    def check_cancelled(self):
        pass


async def on_device(server: Any, channel: Any, fn: Callable[[], object],
                    carrier: Callable[[], Awaitable[object]] | None = None) -> float:
    """Seconds ``fn()`` takes on the server's device thread, between jobs, the server otherwise idle.

    It runs in the device worker's ``run`` of a small carrier job, before that job and 50 ms after the
    worker took it, so the carrier's `queued` event has reached the client by then. The carrier is a
    64², 1-step Generate on ``channel``, or ``carrier()`` (one that uses the model being measured, so
    the carrier loads nothing and evicts nothing)."""
    from paletta.v1 import generate_pb2 as gen
    from paletta.v1 import generate_service_pb2_grpc as gen_grpc
    from tests.helpers import collect

    async def generate() -> object:
        return await collect(gen_grpc.GenerateServiceStub(channel).Generate(
            gen.GenerateRequest(prompt="carrier", width=64, height=64, steps=1, seed=0)))

    worker = server.app.worker
    original = worker.run
    took: list[float] = []
    failed: list[Exception] = []

    def run(assignment):  # noqa: ANN001, ANN202
        time.sleep(0.05)
        start = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # raised here, not on the device thread (which must go on)
            failed.append(exc)
        took.append(time.perf_counter() - start)
        original(assignment)

    worker.run = run
    try:
        await (carrier or generate)()
    finally:
        worker.run = original
    if failed:
        raise failed[0]
    return took[0]
