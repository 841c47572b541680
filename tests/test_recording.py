"""How the job manager records what a worker reports (issue 12: the fixed per-job cost).

Messages that arrive together commit as one transaction yet replay in order after a restart;
one the store refuses does not lose the others; a job and its `queued` event commit together;
an output stored twice stays one; preview pixels leave the store when the live log goes; a
crash between a sidecar and its asset leaves no lone sidecar, and an asset is never removed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import event

from paletta.v1 import job_pb2
from paletta_server.jobs import manager as manager_module
from paletta_server.jobs import messages as msg
from paletta_server.jobs.manager import JobManager
from paletta_server.jobs.state import JobState
from paletta_server.jobs.store import JobStore
from paletta_server.storage import AssetStore
from tests.pg import both_stores

BURST = ["started", "progress", "progress", "preview", "progress", "output", "finished"]


def make_manager(tmp_path: Path, database: str) -> JobManager:
    store = JobStore(database or tmp_path / "jobs.db")
    return JobManager(store, AssetStore(tmp_path / "assets", 1 << 24, 1 << 24), max_queue=10, lookahead=4,
                      max_skips=3)


def take(manager: JobManager, job_id: str) -> None:
    """Hand the job to a worker, as the device's loop would (shared: a claim stores `started`)."""
    if manager.shared:
        assert manager.claim("w1", lambda key: False).job_id == job_id
    else:
        assert manager.next_assignment(threading.Event(), lambda key: False).job_id == job_id


def burst(job_id: str, shared: bool) -> list[msg.Message]:
    """What a worker sends for a 3-step job with one preview and one output, all at once."""
    return [
        *([] if shared else [msg.Started(job_id)]),
        msg.Progress(job_id, 1, 3, "denoising"),
        msg.Progress(job_id, 2, 3, "denoising"),
        msg.Preview(job_id, b"\xff\xd8jpeg", 2),
        msg.Progress(job_id, 3, 3, "denoising"),
        msg.Output(job_id, 0, {"prompt": "p"}, seed=7, image=Image.new("RGB", (16, 8), (10, 200, 30))),
        msg.Finished(job_id),
    ]


def start_with_queued_burst(manager: JobManager, messages: list[msg.Message], monkeypatch) -> None:  # noqa: ANN001
    """Start the event thread with ``messages`` already waiting: it takes them as one batch.
    (Recovery, which a real start runs before any job is taken, would queue the taken job again.)"""
    for message in messages:
        manager.send(message)
    monkeypatch.setattr(manager, "recover", lambda: None)
    manager.start(None)


def wait_final(manager: JobManager, job_id: str) -> None:
    for _ in range(500):
        if JobState(manager.store.get(job_id).state).final:
            return
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} never ended")


def transactions_with_events(store: JobStore, monkeypatch) -> list[int]:  # noqa: ANN001
    """Count, per committed transaction from now on, the events it stored (the list grows live)."""
    counts = [0]
    original = store._add_event

    def add_event(conn, job_id, seq, kind, data):  # noqa: ANN001, ANN202
        counts[-1] += 1
        original(conn, job_id, seq, kind, data)

    monkeypatch.setattr(store, "_add_event", add_event)

    @event.listens_for(store.engine, "commit")
    def commit(conn):  # noqa: ANN001, ANN202
        counts.append(0)

    return counts


@both_stores
def test_a_burst_commits_as_one_transaction_and_replays_in_order_after_a_restart(tmp_path, database,
                                                                                   monkeypatch):
    manager = make_manager(tmp_path, database)
    job_id, _ = manager.submit("generate", b"", 2, "", "flux-schnell", False)
    take(manager, job_id)
    messages = burst(job_id, manager.shared)
    counts = transactions_with_events(manager.store, monkeypatch)
    start_with_queued_burst(manager, messages, monkeypatch)
    try:
        wait_final(manager, job_id)
    finally:
        manager.stop()
        manager.store.dispose()
    # Every event of the burst went in one transaction (shared, `started` came with the claim).
    assert [c for c in counts if c] == [len(messages)]

    store = JobStore(database or tmp_path / "jobs.db")  # a restart: replay from the store alone
    try:
        events = [job_pb2.JobEvent.FromString(d) for d in store.events_after(job_id, 0)]
        assert [e.seq for e in events] == list(range(1, len(BURST) + 2))
        assert [e.WhichOneof("kind") for e in events] == ["queued", *BURST]
        assert [e.progress.step for e in events if e.HasField("progress")] == [1, 2, 3]
        job = events[-1].finished.job
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED and job.last_seq == events[-1].seq
        assert [o.seed for o in job.outputs] == [7] and job.outputs[0].asset.width == 16
        assert events[-2].output == job.outputs[0]
        assert store.get(job_id).last_seq == len(BURST) + 1
        # after_seq replays exactly what a client that saw the first three missed
        assert [job_pb2.JobEvent.FromString(d).seq for d in store.events_after(job_id, 3)] == list(
            range(4, len(BURST) + 2))
    finally:
        store.dispose()


@both_stores
def test_a_message_the_store_refuses_does_not_lose_the_rest_of_its_burst(tmp_path, database, monkeypatch):
    manager = make_manager(tmp_path, database)
    good, _ = manager.submit("generate", b"", 2, "", "flux-schnell", False)
    bad, _ = manager.submit("generate", b"", 2, "", "flux-schnell", False)
    take(manager, good)
    take(manager, bad)
    original = manager.store.append_event

    def refuse_bad(conn, job_id, kind, build):  # noqa: ANN001, ANN202
        if job_id == bad and kind == "progress":
            raise RuntimeError("refused")
        return original(conn, job_id, kind, build)

    monkeypatch.setattr(manager.store, "append_event", refuse_bad)
    mixed = burst(good, manager.shared)
    mixed.insert(2, msg.Progress(bad, 1, 3, "denoising"))  # in the middle of good's burst
    start_with_queued_burst(manager, mixed, monkeypatch)
    try:
        wait_final(manager, good)
        kinds = [job_pb2.JobEvent.FromString(d).WhichOneof("kind") for d in manager.store.events_after(good, 0)]
        assert kinds == ["queued", *BURST]
        bad_kinds = [job_pb2.JobEvent.FromString(d).WhichOneof("kind") for d in manager.store.events_after(bad, 0)]
        assert bad_kinds == ["queued"] + (["started"] if manager.shared else [])
    finally:
        manager.stop()
        manager.store.dispose()


@both_stores
def test_a_job_and_its_queued_event_commit_together(tmp_path, database, monkeypatch):
    manager = make_manager(tmp_path, database)

    def fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(manager.store, "append_event", fail)
    with pytest.raises(RuntimeError):
        manager.submit("generate", b"", 2, "", "flux-schnell", False)
    try:
        assert manager.store.count(JobState.QUEUED) == 0  # no job row without its `queued`
        assert len(manager.scheduler) == 0 and not manager._active
        monkeypatch.undo()
        job_id, _ = manager.submit("generate", b"", 2, "", "flux-schnell", False)
        assert [job_pb2.JobEvent.FromString(d).queued.position for d in manager.store.events_after(job_id, 0)] == [0]
    finally:
        manager.store.dispose()


@both_stores
def test_an_output_stored_twice_stays_one(tmp_path, database):
    manager = make_manager(tmp_path, database)
    store = manager.store
    try:
        job_id, _ = manager.submit("generate", b"", 2, "", "flux-schnell", False)
        for data in (b"first", b"again"):  # a retry after a lost connection
            with store.begin() as conn:
                store.add_output(conn, job_id, 0, data)
        assert [(o.index, o.data) for o in store.outputs(job_id)] == [(0, b"first")]
    finally:
        store.dispose()


async def test_preview_pixels_stay_in_the_store_while_the_live_log_lives(tmp_path, monkeypatch):
    monkeypatch.setattr(manager_module, "LIVE_LOG_S", 0.3)
    manager = make_manager(tmp_path, "")
    manager.start(asyncio.get_running_loop())
    job_id, _ = manager.submit("generate", b"", 2, "", "flux-schnell", False)
    take(manager, job_id)
    for message in burst(job_id, shared=False):
        manager.send(message)
    try:
        events = [e async for e in manager.watch(job_id)]
        assert [e.WhichOneof("kind") for e in events] == ["queued", *BURST]

        def stored_jpegs() -> list[bytes]:
            return [job_pb2.JobEvent.FromString(d).preview.jpeg for d in manager.store.events_after(job_id, 0)
                    if job_pb2.JobEvent.FromString(d).HasField("preview")]

        assert stored_jpegs() == [b"\xff\xd8jpeg"] and job_id in manager._active  # a late watcher still sees them
        for _ in range(200):
            await asyncio.sleep(0.01)
            if job_id not in manager._active and stored_jpegs() == [b""]:
                break
        assert job_id not in manager._active and stored_jpegs() == [b""]  # gone with the live log
        replay = [e async for e in manager.watch(job_id)]  # from the store now: same events, no pixels
        assert [e.seq for e in replay] == [e.seq for e in events] and replay[4].preview.step == 2
    finally:
        manager.stop()
        manager.store.dispose()


def test_a_restart_strips_the_previews_a_stop_left_with_pixels(tmp_path):
    manager = make_manager(tmp_path, "")
    loop = asyncio.new_event_loop()  # never run: the live log's drop never comes, as when stopped
    manager.start(loop)
    job_id, _ = manager.submit("generate", b"", 2, "", "flux-schnell", False)
    take(manager, job_id)
    for message in burst(job_id, shared=False):
        manager.send(message)
    try:
        wait_final(manager, job_id)
    finally:
        manager.stop()
        loop.close()
    assert any(job_pb2.JobEvent.FromString(d).preview.jpeg for d in manager.store.events_after(job_id, 0))
    again = JobManager(manager.store, manager.assets, max_queue=10, lookahead=4, max_skips=3)
    again.recover()
    try:
        previews = [job_pb2.JobEvent.FromString(d) for d in manager.store.events_after(job_id, 0)]
        previews = [e for e in previews if e.HasField("preview")]
        assert len(previews) == 1 and previews[0].preview.step == 2 and not previews[0].preview.jpeg
    finally:
        manager.store.dispose()


def test_a_restart_removes_a_lone_sidecar_and_never_an_asset(tmp_path):
    """The sidecar is written before its asset, so a crash between the two leaves a sidecar describing
    nothing (removed at start); an asset is never removed, even one whose sidecar was lost: storing
    it again makes it whole."""
    assets = AssetStore(tmp_path / "assets", 1 << 24, 1 << 24)
    kept = assets.put_image(Image.new("RGB", (8, 8), (1, 2, 3)))
    bare = assets.put_image(Image.new("RGB", (8, 8), (4, 5, 6)))
    lone_sidecar = assets.put_image(Image.new("RGB", (8, 8), (7, 8, 9)))
    assets.path(bare.name).with_suffix(".json").unlink()
    blob_of_sidecar = assets.path(lone_sidecar.name)
    blob_of_sidecar.unlink()
    bare_path = assets._path(bare.name[len("assets/"):])
    AssetStore(tmp_path / "assets", 1 << 24, 1 << 24)  # a restart
    assert not blob_of_sidecar.with_suffix(".json").exists()
    assert bare_path.exists() and assets.put_image(Image.new("RGB", (8, 8), (4, 5, 6))) == bare
    assert assets.get(bare.name) == bare
    assert assets.get(kept.name) == kept and assets.path(kept.name).read_bytes()[:4] == b"\x89PNG"
