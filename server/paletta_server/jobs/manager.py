"""JobManager: the one interface the api layer sees (submit, watch, cancel, get, list, approve).

It owns the persisted store, the pure scheduler, the live event logs watchers follow, and the
device worker thread. Events are written to SQLite first and then published, so a watcher
that reconnects with ``after_seq`` replays exactly what it missed.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from paletta.v1 import job_pb2
from paletta_server.capabilities.base import Capability
from paletta_server.errors import FailedPrecondition, NotFound, ResourceExhausted, invalid
from paletta_server.jobs import store as st
from paletta_server.jobs.events import job_message, job_name, timestamp
from paletta_server.jobs.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class LiveLog:
    """In-memory event log of an unfinished (or just finished) job, for live watchers."""

    events: list[job_pb2.JobEvent] = field(default_factory=list)
    finished: bool = False
    waiters: list[asyncio.Future] = field(default_factory=list)

    def wake(self) -> None:
        for fut in self.waiters:
            if not fut.done():
                fut.set_result(None)
        self.waiters.clear()


class JobManager:
    def __init__(self, store: st.JobStore, capabilities: dict[str, Capability], *, max_queue: int,
                 lookahead: int, max_skips: int, is_resident: Callable[[str], bool]):
        self.store = store
        self.capabilities = capabilities
        self.max_queue = max_queue
        self.scheduler = Scheduler(lookahead, max_skips)
        self.is_resident = is_resident
        self._cv = threading.Condition()
        self._emit_lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._live: dict[str, LiveLog] = {}
        self._cancel_requested: set[str] = set()
        self.running: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- start-up ------------------------------------------------------------------------
    def recover(self) -> None:
        """After a restart: the interrupted job fails with INTERRUPTED; queued jobs queue again."""
        for row in self.store.in_state(st.RUNNING):
            self._live[row.id] = self._live_from_db(row.id)
            self.finish(row.id, st.FAILED, ("ABORTED", "INTERRUPTED",
                                              "the server stopped while this job was running"))
        for row in self.store.in_state(st.QUEUED):
            self._live[row.id] = self._live_from_db(row.id)
            with self._cv:
                self.scheduler.add(row.id, row.priority, row.model_key)
            self.emit(row.id, "queued", job_pb2.JobQueued(position=self.scheduler.position(row.id)))

    def _live_from_db(self, job_id: str) -> LiveLog:
        return LiveLog([_parse(d) for d in self.store.events_after(job_id, 0)])

    # -- submit --------------------------------------------------------------------------
    def submit(self, capability: str, request: Any, priority: int, request_id: str, model_key: str,
               cancel_on_disconnect: bool) -> tuple[str, bool]:
        """Queue a job; returns (job id, created). A known request_id returns the existing job.

        Blocking (SQLite): the api layer calls it in a thread. Submissions are serialised so a
        request_id is checked and claimed atomically and the queue bound holds.
        """
        with self._submit_lock:
            if request_id:
                existing = self.store.by_request_id(request_id)
                if existing is not None:
                    if existing.capability != capability:
                        raise invalid("request_id", f"already used by a {existing.capability} job")
                    return existing.id, False
            with self._cv:
                if len(self.scheduler) >= self.max_queue:
                    raise ResourceExhausted(f"the queue is full ({self.max_queue} jobs); retry later",
                                            reason="QUEUE_FULL", retry_after_s=5.0)
            row = self.store.create(capability, request.SerializeToString(), priority, request_id, model_key,
                                    cancel_on_disconnect)
            self._live[row.id] = LiveLog()
            with self._cv:
                self.scheduler.add(row.id, priority, model_key)
                position = self.scheduler.position(row.id) + (1 if self.running else 0)
                # Emitted before the worker can see the job, so `queued` always precedes `started`.
                self.emit(row.id, "queued", job_pb2.JobQueued(position=position))
                self._cv.notify()
            return row.id, True

    # -- events --------------------------------------------------------------------------
    def emit(self, job_id: str, kind: str, payload: Any) -> job_pb2.JobEvent:
        """Persist then publish one event; callable from any thread."""
        name = job_name(job_id)
        holder: dict[str, job_pb2.JobEvent] = {}

        def build(seq: int) -> bytes:
            event = job_pb2.JobEvent(job=name, seq=seq, time=timestamp())
            getattr(event, kind).CopyFrom(payload)
            if kind == "finished":  # the final Job names its own last event
                event.finished.job.last_seq = seq
            holder["event"] = event
            return event.SerializeToString()

        with self._emit_lock:  # seq order and live-log order must agree across threads
            self.store.append_event(job_id, kind, build)
            event = holder["event"]
            live = self._live.get(job_id)
            if live is not None:
                live.events.append(event)
                live.finished = live.finished or kind == "finished"
        if live is not None:
            self._wake(live)
        return event

    def _wake(self, live: LiveLog) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            live.wake()
        else:
            loop.call_soon_threadsafe(live.wake)

    async def watch(self, job_id: str, after_seq: int = 0) -> AsyncIterator[job_pb2.JobEvent]:
        """Replay events after ``after_seq``, then follow live until the finished event."""
        live = self._live.get(job_id)
        if live is None:
            if await asyncio.to_thread(self.store.get, job_id) is None:
                raise NotFound(f"job {job_name(job_id)} does not exist", reason="JOB_NOT_FOUND")
            for data in await asyncio.to_thread(self.store.events_after, job_id, after_seq):
                yield _parse(data)
            return
        # A live log holds every event of its job from seq 1, so events[i].seq == i + 1.
        seq = after_seq
        while True:
            pending = live.events[seq:]
            for event in pending:
                yield event
                seq = event.seq
            if live.finished and live.events and seq >= live.events[-1].seq:
                return
            if not pending:
                fut = asyncio.get_running_loop().create_future()
                live.waiters.append(fut)
                await fut

    # -- queries -------------------------------------------------------------------------
    def get_row(self, job_id: str) -> st.JobRow:
        row = self.store.get(job_id)
        if row is None:
            raise NotFound(f"job {job_name(job_id)} does not exist", reason="JOB_NOT_FOUND")
        return row

    def job(self, job_id: str) -> job_pb2.Job:
        return job_message(self.get_row(job_id), self.store.outputs(job_id))

    def list_jobs(self, states: list[str], capability: str, page_size: int, page_token: str
                  ) -> tuple[list[job_pb2.Job], str]:
        # Keyset paging (after the last job of the previous page): new jobs never shift a page.
        after = _decode_token(page_token, "k") if page_token else None
        rows = self.store.list(states, capability, after, page_size + 1)
        jobs = [job_message(r, self.store.outputs(r.id)) for r in rows[:page_size]]
        last = rows[page_size - 1] if len(rows) > page_size else None
        return jobs, (_encode_token("k", f"{last.created.isoformat()}|{last.id}") if last else "")

    def queue_length(self) -> int:
        return len(self.scheduler)

    # -- cancel & approve ----------------------------------------------------------------
    def cancel(self, job_id: str) -> job_pb2.Job:
        """Cancel a queued job at once, a running one at its next check; a finished one is returned as is."""
        row = self.get_row(job_id)
        finish_now = False
        with self._cv:
            if row.state == st.QUEUED and self.scheduler.remove(job_id):
                finish_now = True
            elif row.state in (st.QUEUED, st.RUNNING) and self.running == job_id:
                # Running, or picked by the worker a moment ago: it stops at its next check.
                self._cancel_requested.add(job_id)
        if finish_now:
            self.finish(job_id, st.CANCELLED, ("CANCELLED", "CANCELLED", "cancelled while queued"))
        return self.job(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return job_id in self._cancel_requested

    def approve(self, job_id: str, index: int, approved: bool) -> job_pb2.Job:
        row = self.get_row(job_id)
        if row.state != st.SUCCEEDED:
            raise FailedPrecondition(f"job {job_name(job_id)} is {row.state}; only finished outputs can be approved",
                                     reason="JOB_NOT_SUCCEEDED")
        if not self.store.set_approved(job_id, index, approved):
            raise NotFound(f"job {job_name(job_id)} has no output {index}", reason="OUTPUT_NOT_FOUND")
        return self.job(job_id)

    def approved_outputs(self, page_size: int, page_token: str
                         ) -> tuple[list[tuple[st.JobRow, job_pb2.JobOutput]], str]:
        offset = int(_decode_token(page_token, "o")) if page_token else 0
        rows = self.store.approved(offset, page_size + 1)
        result = []
        for job_row, out_row in rows[:page_size]:
            output = job_pb2.JobOutput.FromString(out_row.data)
            output.approved = True
            result.append((job_row, output))
        return result, (_encode_token("o", str(offset + page_size)) if len(rows) > page_size else "")

    # -- lifecycle used by the worker ----------------------------------------------------
    def next_job(self, stop: threading.Event, timeout: float = 0.5) -> str | None:
        with self._cv:
            if not len(self.scheduler):
                self._cv.wait(timeout)
            if stop.is_set() or not len(self.scheduler):
                return None
            job_id = self.scheduler.pick(self.is_resident)
            self.running = job_id
            return job_id

    def start(self, job_id: str) -> None:
        self.store.set_state(job_id, st.RUNNING)
        self.emit(job_id, "started", job_pb2.JobStarted())

    def add_output(self, job_id: str, output: job_pb2.JobOutput) -> None:
        self.store.add_output(job_id, output.index, output.SerializeToString())
        self.emit(job_id, "output", output)

    def finish(self, job_id: str, state: str, error: tuple[str, str, str] | None = None) -> None:
        row = self.store.set_state(job_id, state, error=error)
        self._cancel_requested.discard(job_id)
        self.emit(job_id, "finished", job_pb2.JobFinished(job=job_message(row, self.store.outputs(job_id))))
        # Previews only matter while a job runs: their pixels are dropped from the stored log so it
        # stays small (the events and their seqs stay). Watchers in the next 30 s still replay from
        # memory, with pixels; later ones from the store, without.
        self.store.strip_previews(job_id, _without_jpeg)
        if self.running == job_id:
            self.running = None
        self._forget_later(job_id)

    def _forget_later(self, job_id: str, delay: float = 30.0) -> None:
        """Drop a finished live log after a while; later watchers replay from the database."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.call_later, delay, self._live.pop, job_id, None)

    def wake_worker(self) -> None:
        with self._cv:
            self._cv.notify_all()


def _without_jpeg(data: bytes) -> bytes:
    event = job_pb2.JobEvent.FromString(data)
    event.preview.ClearField("jpeg")
    return event.SerializeToString()


def _parse(data: bytes) -> job_pb2.JobEvent:
    return job_pb2.JobEvent.FromString(data)


def _encode_token(kind: str, value: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode()


def _decode_token(token: str, kind: str) -> str:
    try:
        found, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if found != kind or not value or (kind == "o" and not value.isdigit()):
            raise ValueError
        if kind == "k":
            created, _, job_id = value.partition("|")
            datetime.fromisoformat(created)
            if not job_id.isalnum():
                raise ValueError
        return value
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid("page_token", "not a token returned by this server for this list") from exc
