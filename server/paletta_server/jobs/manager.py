"""JobManager: the one interface the api layer sees (submit, watch, cancel, get, list, approve),
and the other end of the device worker's link (assignments out, plain messages in).

It owns the persisted store, the pure scheduler, the job state machine and the live event logs
watchers follow. Events are written to the store first and then published, so a watcher that
reconnects with ``after_seq`` replays exactly what it missed. Messages from the worker go
through a queue to one event thread, which stores outputs (PNG encoding included) and events in
arrival order: the device thread never waits for storage, and starts its next job while the last
one's outputs are still being written; the job's ``finished`` still comes after all of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from google.rpc import status_pb2

from paletta.v1 import image_pb2, job_pb2
from paletta_server.errors import (
    FailedPrecondition,
    Interrupted,
    JobCancelled,
    NotFound,
    PalettaError,
    ResourceExhausted,
    invalid,
    to_status,
)
from paletta_server.jobs import messages as msg
from paletta_server.jobs import paging
from paletta_server.jobs import store as st
from paletta_server.jobs.events import job_message, job_name, timestamp
from paletta_server.jobs.scheduler import Scheduler
from paletta_server.jobs.state import JobState, check_transition
from paletta_server.storage import AssetStore

log = logging.getLogger(__name__)
CANCELLED_CODE = 1  # google.rpc.Code.CANCELLED
# typed result message → its field in JobOutput's `result` oneof
RESULT_FIELDS = {f.message_type.full_name: f.name for f in job_pb2.JobOutput.DESCRIPTOR.oneofs_by_name["result"].fields}


@dataclass
class ActiveJob:
    """A job that is queued, running, or finished a moment ago: its state and its live event log.

    ``events`` holds every event of the job from seq 1, so ``events[i].seq == i + 1``.
    """

    capability: str
    spec: bytes
    state: JobState
    events: list[job_pb2.JobEvent] = field(default_factory=list)
    waiters: list[asyncio.Future] = field(default_factory=list)
    assigned: bool = False  # handed to the worker (its `started` may not be stored yet)
    cancel_requested: bool = False
    output_error: status_pb2.Status | None = None  # storing an output failed: the job fails

    @property
    def ended(self) -> bool:
        return bool(self.events) and self.events[-1].WhichOneof("kind") == "finished"

    def wake(self) -> None:
        for fut in self.waiters:
            if not fut.done():
                fut.set_result(None)
        self.waiters.clear()


class JobManager:
    def __init__(self, store: st.JobStore, assets: AssetStore, *, max_queue: int, lookahead: int, max_skips: int):
        self.store = store
        self.assets = assets
        self.max_queue = max_queue
        self.scheduler = Scheduler(lookahead, max_skips)
        self._cv = threading.Condition()  # guards the scheduler and the ActiveJobs' state flags
        self._emit_lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._active: dict[str, ActiveJob] = {}
        self._inbox: queue.SimpleQueue[msg.Message | None] = queue.SimpleQueue()
        self._events_thread = threading.Thread(target=self._pump, name="paletta-events", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- start-up and shutdown -----------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Recover persisted jobs and start the event thread; call from the serving loop."""
        self.loop = loop
        self.recover()
        self._events_thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Store what the worker already sent (outputs included), then stop the event thread."""
        if self._events_thread.is_alive():
            self._inbox.put(None)
            self._events_thread.join(timeout)

    def recover(self) -> None:
        """After a restart: the interrupted job fails with INTERRUPTED; queued jobs queue again."""
        for row in self.store.in_state(JobState.RUNNING):
            self._active[row.id] = self._active_from_db(row)
            self._transition(row.id, JobState.FAILED,
                             to_status(Interrupted("the server stopped while this job was running")))
        for row in self.store.in_state(JobState.QUEUED):
            self._active[row.id] = self._active_from_db(row)
            with self._cv:
                self.scheduler.add(row.id, row.priority, row.model_key)
            self.emit(row.id, "queued", job_pb2.JobQueued(position=self.scheduler.position(row.id)))

    def _active_from_db(self, row: st.JobRow) -> ActiveJob:
        return ActiveJob(row.capability, row.spec, JobState(row.state),
                         [_parse(d) for d in self.store.events_after(row.id, 0)])

    # -- submit --------------------------------------------------------------------------
    def submit(self, capability: str, spec: bytes, priority: int, request_id: str, model_key: str,
               cancel_on_disconnect: bool) -> tuple[str, bool]:
        """Queue a job (``spec`` is a serialized JobSpec); returns (job id, created).

        A known request_id returns the existing job. Blocking (SQLite): the api layer calls it in
        a thread. Submissions are serialised so a request_id is checked and claimed atomically
        and the queue bound holds.
        """
        with self._submit_lock:
            if request_id:
                existing = self.store.by_request_id(request_id)
                if existing is not None:
                    if existing.capability != capability:
                        raise invalid("options.request_id", f"already used by a {existing.capability} job")
                    return existing.id, False
            with self._cv:
                if len(self.scheduler) >= self.max_queue:
                    raise ResourceExhausted(f"the queue is full ({self.max_queue} jobs); retry later",
                                            reason="QUEUE_FULL", retry_after_s=5.0)
            row = self.store.create(capability, spec, priority, request_id, model_key, cancel_on_disconnect)
            self._active[row.id] = ActiveJob(capability, spec, JobState.QUEUED)
            with self._cv:
                self.scheduler.add(row.id, priority, model_key)
                ahead = sum(1 for job in self._active.values() if job.assigned and not job.state.final)
                # Emitted before the worker can see the job, so `queued` always precedes `started`.
                self.emit(row.id, "queued", job_pb2.JobQueued(position=self.scheduler.position(row.id) + ahead))
                self._cv.notify()
            return row.id, True

    # -- events --------------------------------------------------------------------------
    def emit(self, job_id: str, kind: str, payload: object) -> job_pb2.JobEvent:
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
            active = self._active.get(job_id)
            if active is not None:
                active.events.append(event)
        if active is not None:
            self._wake(active)
        return event

    def _wake(self, active: ActiveJob) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            active.wake()
        else:
            loop.call_soon_threadsafe(active.wake)

    async def watch(self, job_id: str, after_seq: int = 0) -> AsyncIterator[job_pb2.JobEvent]:
        """Replay events after ``after_seq``, then follow live until the finished event."""
        active = self._active.get(job_id)
        if active is None:
            if await asyncio.to_thread(self.store.get, job_id) is None:
                raise NotFound(f"job {job_name(job_id)} does not exist", reason="JOB_NOT_FOUND")
            for data in await asyncio.to_thread(self.store.events_after, job_id, after_seq):
                yield _parse(data)
            return
        seq = after_seq
        while True:
            pending = active.events[seq:]
            for event in pending:
                yield event
                seq = event.seq
            if active.ended and seq >= active.events[-1].seq:
                return
            if not pending:
                fut = asyncio.get_running_loop().create_future()
                active.waiters.append(fut)
                await fut

    # -- the state machine ---------------------------------------------------------------
    def _transition(self, job_id: str, new: JobState, error: status_pb2.Status | None = None) -> None:
        """The only place a job changes state: check the move, persist it, emit its event."""
        active = self._active.get(job_id)
        old = active.state if active is not None else JobState(self.get_row(job_id).state)
        check_transition(job_id, old, new)
        if active is not None:
            active.state = new
        row = self.store.set_state(job_id, new, error=error.SerializeToString() if error is not None else None)
        if new == JobState.RUNNING:
            self.emit(job_id, "started", job_pb2.JobStarted())
            return
        if new.final:
            # Previews only matter while a job runs: their pixels are dropped from the stored log so
            # it stays small (the events and their seqs stay). Watchers in the next 30 s still replay
            # from memory, with pixels; later ones from the store, without.
            self.store.strip_previews(job_id, _without_jpeg)
            self.emit(job_id, "finished", job_pb2.JobFinished(job=job_message(row, self.store.outputs(job_id))))
            self._forget_later(job_id)

    def _forget_later(self, job_id: str, delay: float = 30.0) -> None:
        """Drop a finished job's live log after a while; later watchers replay from the database."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.call_later, delay, self._active.pop, job_id, None)

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
        after = paging.decode_job_key(page_token) if page_token else None
        rows = self.store.list(states, capability, after, page_size + 1)
        jobs = [job_message(r, self.store.outputs(r.id)) for r in rows[:page_size]]
        last = rows[page_size - 1] if len(rows) > page_size else None
        return jobs, (paging.encode_job_key(last.created, last.id) if last else "")

    def queue_length(self) -> int:
        return len(self.scheduler)

    def running_job(self) -> str:
        """The name of the job on the device, or ""."""
        running = [job_id for job_id, job in list(self._active.items()) if job.state == JobState.RUNNING]
        return job_name(running[-1]) if running else ""

    # -- cancel & approve ----------------------------------------------------------------
    def cancel(self, job_id: str) -> job_pb2.Job:
        """Cancel a queued job at once, a running one at its next check; a finished one is returned as is."""
        self.get_row(job_id)
        finish_now = False
        with self._cv:
            active = self._active.get(job_id)
            if active is not None and not active.state.final:
                if not active.assigned and self.scheduler.remove(job_id):
                    finish_now = True
                else:  # running, or picked by the worker a moment ago: it stops at its next check
                    active.cancel_requested = True
        if finish_now:
            self._transition(job_id, JobState.CANCELLED, to_status(JobCancelled("cancelled while queued")))
        return self.job(job_id)

    def approve(self, job_id: str, index: int, approved: bool) -> job_pb2.Job:
        row = self.get_row(job_id)
        if row.state != JobState.SUCCEEDED:
            raise FailedPrecondition(f"job {job_name(job_id)} is {row.state}; only finished outputs can be approved",
                                     reason="JOB_NOT_SUCCEEDED")
        if not self.store.set_approved(job_id, index, approved):
            raise NotFound(f"job {job_name(job_id)} has no output {index}", reason="OUTPUT_NOT_FOUND")
        return self.job(job_id)

    def approved_outputs(self, page_size: int, page_token: str
                         ) -> tuple[list[tuple[st.JobRow, job_pb2.JobOutput]], str]:
        after = paging.decode_output_key(page_token) if page_token else None
        rows = self.store.approved(after, page_size + 1)
        result = []
        for job_row, out_row in rows[:page_size]:
            output = job_pb2.JobOutput.FromString(out_row.data)
            output.approved = True
            result.append((job_row, output))
        token = ""
        if len(rows) > page_size:
            last_job, last_out = rows[page_size - 1]
            token = paging.encode_output_key(last_job.created, last_job.id, last_out.index)
        return result, token

    # -- the worker's link (messages.WorkerLink) -----------------------------------------
    def next_assignment(self, stop: threading.Event, resident: Callable[[str], bool],
                        timeout: float = 0.5) -> msg.Assignment | None:
        with self._cv:
            if not len(self.scheduler):
                self._cv.wait(timeout)
            if stop.is_set() or not len(self.scheduler):
                return None
            job_id = self.scheduler.pick(resident)
            active = self._active[job_id]
            active.assigned = True
            return msg.Assignment(job_id, active.capability, active.spec)

    def send(self, message: msg.Message) -> None:
        self._inbox.put(message)

    def cancel_requested(self, job_id: str) -> bool:
        active = self._active.get(job_id)
        return active is not None and active.cancel_requested

    def wake_worker(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # -- the event thread ------------------------------------------------------------------
    def _pump(self) -> None:
        while (message := self._inbox.get()) is not None:
            try:
                self._handle(message)
            except Exception:  # a store failure must not stop the events of other jobs
                log.exception("could not record %s", type(message).__name__)

    def _handle(self, message: msg.Message) -> None:
        job_id = message.job_id
        if isinstance(message, msg.Started):
            self._transition(job_id, JobState.RUNNING)
            log.info("job %s %s started", job_id, self._active[job_id].capability)
        elif isinstance(message, msg.Progress):
            self.emit(job_id, "progress", job_pb2.JobProgress(step=message.step, total_steps=message.total,
                                                             stage=message.stage, model=message.model))
        elif isinstance(message, msg.Preview):
            self.emit(job_id, "preview", job_pb2.JobPreview(jpeg=message.jpeg, step=message.step))
        elif isinstance(message, msg.Output):
            self._store_output(message)
        elif isinstance(message, msg.Finished):
            self._finish(message)

    def _store_output(self, message: msg.Output) -> None:
        output = job_pb2.JobOutput(index=message.index, seed=message.seed,
                                   parameters=json.dumps(message.parameters, sort_keys=True))
        try:
            info = message.asset
            if message.image is not None:
                info = self.assets.put_image(message.image, message.parameters)
        except PalettaError as exc:
            self._active[message.job_id].output_error = to_status(exc)
            return
        if info is not None:
            output.asset.CopyFrom(image_pb2.Asset(name=info.name, mime=info.mime, width=info.width,
                                                  height=info.height, size_bytes=info.size_bytes))
        if message.result_type:
            getattr(output, RESULT_FIELDS[message.result_type]).ParseFromString(message.result)
        self.store.add_output(message.job_id, output.index, output.SerializeToString())
        self.emit(message.job_id, "output", output)

    def _finish(self, message: msg.Finished) -> None:
        active = self._active[message.job_id]
        error = message.error or active.output_error
        state = (JobState.SUCCEEDED if error is None
                 else JobState.CANCELLED if error.code == CANCELLED_CODE else JobState.FAILED)
        self._transition(message.job_id, state, error)
        log.info("job %s %s %s in %.2f s%s", message.job_id, active.capability, state.value.lower(), message.seconds,
                 f" ({error.message})" if error is not None and state == JobState.FAILED else "")


def _without_jpeg(data: bytes) -> bytes:
    event = job_pb2.JobEvent.FromString(data)
    event.preview.ClearField("jpeg")
    return event.SerializeToString()


def _parse(data: bytes) -> job_pb2.JobEvent:
    return job_pb2.JobEvent.FromString(data)
