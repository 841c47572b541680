"""JobManager: the one interface the api layer sees (submit, watch, cancel, get, list, approve),
and the recorder of what device workers report (plain messages in, state and events out).

It owns the persisted store, the job state machine and the live event logs watchers follow.
Events are written to the store first and then published, so a watcher that reconnects with
``after_seq`` replays exactly what it missed. Messages from a worker go through a queue to one
event thread, which stores outputs (PNG encoding included) and events in arrival order: the
device thread never waits for storage, and starts its next job while the last one's outputs are
still being written; the job's ``finished`` still comes after all of them.

Two modes, chosen by the store:

* embedded (SQLite): the queue is the in-memory scheduler, the manager itself is the in-process
  worker's link, and live logs are filled as events are emitted — one process owns everything.
* shared (PostgreSQL): the store is the queue. Workers anywhere claim jobs through a
  ``PostgresLink`` (jobs/postgres.py) whose messages this same recorder writes; front ends fill
  their live logs from the store when ``NOTIFY paletta_events`` says a job has a new event, so
  any front end serves any job. State changes are compare-and-set in the store, so two
  processes never move one job twice; a janitor in every process fails jobs whose worker's lease
  ran out (INTERRUPTED) and strips finished jobs' preview pixels once watchers are done with them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from google.protobuf.message import Message
from google.rpc import status_pb2
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from paletta.v1 import image_pb2, job_pb2
from paletta_server.errors import (
    FailedPrecondition,
    FieldViolation,
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
from paletta_server.jobs.events import STATE_NAMES, job_message, job_name, timestamp
from paletta_server.jobs.scheduler import Scheduler
from paletta_server.jobs.state import JobState, check_transition
from paletta_server.storage import AssetStore

log = logging.getLogger(__name__)
CANCELLED_CODE = 1  # google.rpc.Code.CANCELLED
# typed result message → its field in JobOutput's `result` oneof
RESULT_FIELDS = {f.message_type.full_name: f.name for f in job_pb2.JobOutput.DESCRIPTOR.oneofs_by_name["result"].fields}
LIVE_LOG_S = 30.0  # a finished job's live log (previews with pixels) is kept this long
FOLLOW_POLL_S = 1.0  # shared mode: a watcher re-reads the store this often even without NOTIFY
STORE_RETRY_S = 120.0  # how long the event thread retries a write while the database is unreachable
MAX_BATCH = 64  # messages the event thread records in one transaction at most


@dataclass
class ActiveJob:
    """A job that is queued, running, or finished a moment ago: its state and its live event log.

    ``events`` holds every event of the job from seq 1, so ``events[i].seq == i + 1``. Embedded,
    the manager appends as it emits; shared, ``_fetch`` appends what the store holds.
    """

    capability: str
    spec: bytes
    state: JobState
    events: list[job_pb2.JobEvent] = field(default_factory=list)
    waiters: list[asyncio.Future] = field(default_factory=list)
    assigned: bool = False  # handed to the worker (its `started` may not be stored yet)
    cancel_requested: bool = False
    fetching: bool = False  # shared: a read of new events from the store is under way …
    dirty: bool = False  # … and another notification came during it

    @property
    def ended(self) -> bool:
        return bool(self.events) and self.events[-1].WhichOneof("kind") == "finished"

    def wake(self) -> None:
        for fut in self.waiters:
            if not fut.done():
                fut.set_result(None)
        self.waiters.clear()


class JobManager:
    def __init__(self, store: st.JobStore, assets: AssetStore, *, max_queue: int, lookahead: int, max_skips: int,
                 lease_seconds: float = 10.0):
        self.store = store
        self.assets = assets
        self.max_queue = max_queue
        self.shared = store.shared
        self.lease_seconds = lease_seconds
        self.scheduler = Scheduler(lookahead, max_skips)
        self._cv = threading.Condition()  # guards the scheduler and the ActiveJobs' state flags
        self._emit_lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._active: dict[str, ActiveJob] = {}
        self._output_errors: dict[str, status_pb2.Status] = {}  # storing an output failed: the job fails
        self._claimed: dict[str, str] = {}  # shared: job id → the worker of this process that claimed it
        self._inbox: queue.SimpleQueue[msg.Message | None] = queue.SimpleQueue()
        self._events_thread = threading.Thread(target=self._pump, name="paletta-events", daemon=True)
        self._stopping = threading.Event()
        self._janitor = threading.Thread(target=self._janitor_loop, name="paletta-janitor", daemon=True)
        self._tasks: set[asyncio.Task] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- start-up and shutdown -----------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Start recording; ``loop`` is the serving loop (None in a worker process, which serves no
        watchers). Embedded, persisted jobs are recovered first; shared, the janitor and (with a
        loop) the store's notifications take that role."""
        self.loop = loop
        if self.shared:
            self._janitor.start()
            if loop is not None:
                from paletta_server.jobs.postgres import listen

                self._spawn(listen(self.store.url, st.EVENTS_CHANNEL, self._on_notify, self._on_reconnect))
        else:
            self.recover()
        self._events_thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Store what the worker already sent (outputs included), then stop the event thread."""
        self._stopping.set()
        if self._events_thread.is_alive():
            self._inbox.put(None)
            self._events_thread.join(timeout)
        if self._janitor.is_alive():
            self._janitor.join(timeout)
        for task in list(self._tasks):
            if self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(task.cancel)

    def recover(self) -> None:
        """Embedded, after a restart: the interrupted job fails with INTERRUPTED; queued jobs queue
        again; jobs that ended shortly before the stop lose their stored previews' pixels."""
        self.strip_ended_previews(0.0)
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

    def _spawn(self, coro) -> None:  # noqa: ANN001
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- submit --------------------------------------------------------------------------
    def submit(self, capability: str, spec: bytes, priority: int, request_id: str, model_key: str,
               cancel_on_disconnect: bool) -> tuple[str, bool]:
        """Queue a job (``spec`` is a serialized JobSpec); returns (job id, created).

        A known request_id returns the existing job. Blocking (database): the api layer calls it
        in a thread. Submissions are serialised so a request_id is checked and claimed atomically
        and the queue bound holds (shared, the store's unique request_id settles races between
        front ends, and the bound is per cluster, give or take a submission racing another).
        """
        with self._submit_lock:
            if request_id:
                existing = self.store.by_request_id(request_id)
                if existing is not None:
                    return self._existing(existing, capability)
            if self.shared:
                return self._submit_shared(capability, spec, priority, request_id, model_key, cancel_on_disconnect)
            with self._cv, self._emit_lock:
                if len(self.scheduler) >= self.max_queue:
                    raise _queue_full(self.max_queue)
                job_id = ""
                try:
                    # The job and its `queued` event commit together, before the worker can see the
                    # job (it picks under the same lock), so `queued` always precedes `started`.
                    with self.store.begin() as conn:
                        job_id = self.store.create(conn, capability, spec, priority, request_id, model_key,
                                                   cancel_on_disconnect).id
                        self.scheduler.add(job_id, priority, model_key)
                        ahead = sum(1 for job in self._active.values() if job.assigned and not job.state.final)
                        queued = self._append(conn, job_id, "queued",
                                              job_pb2.JobQueued(position=self.scheduler.position(job_id) + ahead))
                except BaseException:
                    self.scheduler.remove(job_id)
                    raise
                assert queued is not None
                # Its live log starts with `queued`: no watcher can be waiting on it yet.
                self._active[job_id] = ActiveJob(capability, spec, JobState.QUEUED, [queued])
                self._cv.notify()
            return job_id, True

    def _existing(self, row: st.JobRow, capability: str) -> tuple[str, bool]:
        if row.capability != capability:
            raise invalid("options.request_id", f"already used by a {row.capability} job")
        return row.id, False

    def _submit_shared(self, capability: str, spec: bytes, priority: int, request_id: str, model_key: str,
                       cancel_on_disconnect: bool) -> tuple[str, bool]:
        if self.store.count(JobState.QUEUED) >= self.max_queue:
            raise _queue_full(self.max_queue)
        try:
            with self.store.begin() as conn:
                row = self.store.create(conn, capability, spec, priority, request_id, model_key, cancel_on_disconnect)
                # Workers claim only jobs whose `queued` event is stored, so it always precedes `started`.
                position = self.store.position(conn, row, self.scheduler.max_skips)
                self._append(conn, row.id, "queued", job_pb2.JobQueued(position=position))
        except IntegrityError:  # another front end took this request_id a moment ago
            existing = self.store.by_request_id(request_id) if request_id else None
            if existing is None:
                raise
            return self._existing(existing, capability)
        return row.id, True

    # -- events --------------------------------------------------------------------------
    def emit(self, job_id: str, kind: str, payload: Message) -> job_pb2.JobEvent | None:
        """Persist then publish one event; callable from any thread. None when the job is already
        over (a late report from a worker whose lease ran out)."""
        with self._emit_lock:  # seq order and live-log order must agree across threads
            with self.store.begin() as conn:
                event = self._append(conn, job_id, kind, payload)
            if event is not None:
                self._wake(self._publish(job_id, event))
            return event

    def _append(self, conn: Connection, job_id: str, kind: str, payload: Message) -> job_pb2.JobEvent | None:
        """Store one event in ``conn``'s transaction (the caller publishes it once that commits)."""
        event = job_pb2.JobEvent(job=job_name(job_id), time=timestamp())
        getattr(event, kind).CopyFrom(payload)

        def build(seq: int) -> bytes:
            event.seq = seq
            return event.SerializeToString()

        return event if self.store.append_event(conn, job_id, kind, build) is not None else None

    def _publish(self, job_id: str, event: job_pb2.JobEvent) -> ActiveJob | None:
        """Embedded: append a stored event to the live log (call under the emit lock, after the
        commit) and return the job to wake. Shared: nothing — the store's NOTIFY reaches every
        front end, this one included."""
        if self.shared:
            return None
        active = self._active.get(job_id)
        if active is not None:
            active.events.append(event)
            kind = event.WhichOneof("kind")
            if kind == "started":
                active.state = JobState.RUNNING
            elif kind == "finished":
                active.state = JobState(STATE_NAMES[event.finished.job.state])
        return active

    def _wake(self, *jobs: ActiveJob | None) -> None:
        """Wake the watchers of ``jobs`` on the serving loop (one hop for all of them)."""
        loop = self.loop
        woken = tuple(job for job in jobs if job is not None)
        if not woken or loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            _wake_all(woken)
        else:
            loop.call_soon_threadsafe(_wake_all, woken)

    async def watch(self, job_id: str, after_seq: int = 0) -> AsyncIterator[job_pb2.JobEvent]:
        """Replay events after ``after_seq``, then follow live until the finished event."""
        active = await self._follow(job_id) if self.shared else self._active.get(job_id)
        if active is None:
            if await asyncio.to_thread(self.store.get, job_id) is None:
                raise job_not_found(job_id)
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
                if not self.shared:
                    await fut
                    continue
                try:  # a notification lost with a dropped LISTEN connection costs at most this long
                    await asyncio.wait_for(fut, FOLLOW_POLL_S)
                except TimeoutError:
                    self._on_notify(job_id)

    # -- shared mode: following the store ---------------------------------------------------
    async def _follow(self, job_id: str) -> ActiveJob | None:
        """This front end's live log of a job that is not over (None for an unknown or finished one,
        which is replayed from the store)."""
        active = self._active.get(job_id)
        if active is None:
            row = await asyncio.to_thread(self.store.get, job_id)
            if row is None or JobState(row.state).final:
                return None
            active = self._active.setdefault(job_id, ActiveJob(row.capability, row.spec, JobState(row.state)))
        if not active.events:
            active.fetching = True
            await self._fetch(job_id, active)
        return active

    def _on_notify(self, job_id: str) -> None:
        """The store has a new event of ``job_id`` (on the serving loop): read it if anyone follows."""
        active = self._active.get(job_id)
        if active is None:
            return
        if active.fetching:
            active.dirty = True
            return
        active.fetching = True
        self._spawn(self._fetch(job_id, active))

    def _on_reconnect(self) -> None:
        """LISTEN (re)connected: catch up on whatever was announced while it was down."""
        for job_id in list(self._active):
            self._on_notify(job_id)

    async def _fetch(self, job_id: str, active: ActiveJob) -> None:
        try:
            while True:
                active.dirty = False
                try:
                    data = await asyncio.to_thread(self.store.events_after, job_id, len(active.events))
                except Exception as exc:  # the database is away: watchers wait and poll again
                    log.warning("could not read events of %s: %s", job_id, exc)
                    return
                for item in data:
                    event = _parse(item)
                    if event.seq == len(active.events) + 1:  # reads may overlap: each seq once, in order
                        active.events.append(event)
                        if event.WhichOneof("kind") == "finished":
                            self._forget_later(job_id)
                active.wake()
                if not active.dirty:
                    return
        finally:
            active.fetching = False

    # -- the state machine ---------------------------------------------------------------
    def _transition(self, job_id: str, new: JobState, error: status_pb2.Status | None = None, *,
                    expect: JobState | None = None, worker: str | None = None,
                    lease_expired_before=None) -> bool:  # noqa: ANN001
        """Change a job's state on its own (cancel, recovery, the janitor): check the move, then
        persist it with its event in one transaction. False when another process moved the job
        first (shared mode)."""
        active = self._active.get(job_id)
        if expect is None:
            expect = active.state if active is not None and not self.shared else JobState(self.get_row(job_id).state)
        with self._emit_lock:
            with self.store.begin() as conn:
                event = self._move(conn, job_id, new, error, expect=expect, worker=worker,
                                   lease_expired_before=lease_expired_before)
            if event is None:
                return False
            self._wake(self._publish(job_id, event))
        if new.final:
            self._ended(job_id)
        return True

    def _move(self, conn: Connection, job_id: str, new: JobState, error: status_pb2.Status | None, *,
              expect: JobState, worker: str | None = None, lease_expired_before=None  # noqa: ANN001
              ) -> job_pb2.JobEvent | None:
        """The only place a job changes state: check the move, then store it with its event in
        ``conn``'s transaction (the caller publishes the event once that commits). None when the
        job was not in ``expect`` (another process moved it first)."""
        check_transition(job_id, expect, new)
        event = job_pb2.JobEvent(job=job_name(job_id), time=timestamp())

        def make_event(seq: int, row: st.JobRow | None, outputs: list[st.OutputRow]) -> bytes:
            event.seq = seq
            if row is None:
                event.started.SetInParent()
            else:  # the final Job names its own last event
                event.finished.job.CopyFrom(job_message(row, outputs))
            return event.SerializeToString()

        data = self.store.transition(conn, job_id, new, expect, make_event,
                                     "started" if new == JobState.RUNNING else "finished",
                                     error=error.SerializeToString() if error is not None else None,
                                     worker=worker, lease_expired_before=lease_expired_before)
        return event if data is not None else None

    def _ended(self, job_id: str) -> None:
        """After a job's `finished` is published (embedded): its live log, previews with pixels, is
        kept LIVE_LOG_S for watchers, then dropped with those pixels in the stored log (the events
        and their seqs stay). Shared, the janitor strips them as late, once every front end has
        read them."""
        if self.shared:
            return
        loop = self.loop
        if loop is None or loop.is_closed():
            self._strip_previews(job_id)
        else:
            loop.call_soon_threadsafe(loop.call_later, LIVE_LOG_S, self._forget, job_id)

    def _forget(self, job_id: str) -> None:
        """Embedded, on the serving loop: drop a finished job's live log and its stored previews' pixels."""
        self._active.pop(job_id, None)
        self._spawn(asyncio.to_thread(self._strip_previews, job_id))

    def _strip_previews(self, job_id: str) -> None:
        try:
            self.store.strip_previews(job_id, _without_jpeg)
        except Exception as exc:  # only their size is at stake; the next start strips them
            log.warning("could not strip the previews of %s: %s", job_id, exc)

    def _forget_later(self, job_id: str, delay: float = LIVE_LOG_S) -> None:
        """Shared: drop a finished job's live log after a while; later watchers replay from the database."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.call_later, delay, self._active.pop, job_id, None)

    # -- queries -------------------------------------------------------------------------
    def get_row(self, job_id: str) -> st.JobRow:
        row = self.store.get(job_id)
        if row is None:
            raise job_not_found(job_id)
        return row

    def job(self, job_id: str) -> job_pb2.Job:
        return job_message(self.get_row(job_id), self.store.outputs(job_id))

    def list_jobs(self, states: list[str], capability: str, page_size: int, page_token: str
                  ) -> tuple[list[job_pb2.Job], str]:
        # Keyset paging (after the last job of the previous page): new jobs never shift a page.
        after = paging.decode_job_key(page_token, states, capability) if page_token else None
        if after is not None:
            self._check_page_key(*after)
        rows = self.store.list(states, capability, after, page_size + 1)
        jobs = [job_message(r, self.store.outputs(r.id)) for r in rows[:page_size]]
        last = rows[page_size - 1] if len(rows) > page_size else None
        return jobs, (paging.encode_job_key(last.created, last.id, states, capability) if last else "")

    def _check_page_key(self, created: datetime, job_id: str, index: int | None = None) -> None:
        """A page key names a job (and output) that exists, with its create time: else it is forged."""
        row = self.store.get(job_id)
        if row is None or row.created != created or (
                index is not None and index >= len(self.store.outputs(job_id))):
            raise paging.bad_token()

    def queue_length(self) -> int:
        return self.store.count(JobState.QUEUED) if self.shared else len(self.scheduler)

    def running_job(self) -> str:
        """The name of the job on this process's device, or ""."""
        if self.shared:
            running = list(self._claimed)
        else:
            running = [job_id for job_id, job in list(self._active.items()) if job.state == JobState.RUNNING]
        return job_name(running[-1]) if running else ""

    # -- cancel & approve ----------------------------------------------------------------
    def cancel(self, job_id: str) -> job_pb2.Job:
        """Cancel a queued job at once, a running one at its next check; a finished one is returned as is."""
        self.get_row(job_id)
        if self.shared:
            # The flag first: if a worker claims the job in between, it stops at its first check.
            if self.store.request_cancel(job_id):
                self._transition(job_id, JobState.CANCELLED, to_status(JobCancelled("cancelled while queued")),
                                 expect=JobState.QUEUED)
            return self.job(job_id)
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
            raise NotFound(f"job {job_name(job_id)} has no output {index}", reason="OUTPUT_NOT_FOUND",
                           violations=[FieldViolation("index", f"job {job_name(job_id)} has no output {index}")])
        return self.job(job_id)

    def approved_outputs(self, page_size: int, page_token: str
                         ) -> tuple[list[tuple[st.JobRow, job_pb2.JobOutput]], str]:
        after = paging.decode_output_key(page_token) if page_token else None
        if after is not None:
            self._check_page_key(*after)
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

    # -- the in-process worker's link (messages.WorkerLink), embedded mode --------------------
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

    # -- shared mode: what a PostgresLink asks of the recorder ---------------------------------
    def claim(self, worker: str, resident: Callable[[str], bool]) -> msg.Assignment | None:
        """Claim the next job for ``worker`` from the shared queue: the scheduler's policy
        (priority, aging, affinity look-ahead) over the queue's head, QUEUED → RUNNING with its
        ``started`` event in the same transaction."""
        check_transition("(claimed)", JobState.QUEUED, JobState.RUNNING)
        policy = self.scheduler

        def pick(candidates: list[st.JobRow]) -> tuple[str, dict[str, int]]:
            window = Scheduler(policy.lookahead, policy.max_skips)
            for job in sorted(candidates, key=lambda j: (j.created, j.id)):  # arrival order
                window.add(job.id, job.priority, job.model_key, job.skips)
            chosen = window.pick(resident)
            assert chosen is not None
            return chosen, {job.job_id: job.skips for job in window.ordered()}

        def make_event(seq: int, row: st.JobRow | None, outputs: list[st.OutputRow]) -> bytes:
            assert row is not None  # the claimed job, as it was queued
            return job_pb2.JobEvent(job=job_name(row.id), seq=seq, time=timestamp(),
                                    started=job_pb2.JobStarted()).SerializeToString()

        lease_until = st.now() + timedelta(seconds=self.lease_seconds)
        claimed = self.store.claim(worker, lease_until, pick, make_event,
                                   limit=policy.lookahead + 1, max_skips=policy.max_skips)
        if claimed is None:
            return None
        row = claimed[0]
        self._claimed[row.id] = worker
        log.info("job %s %s started on %s", row.id, row.capability, worker)
        return msg.Assignment(row.id, row.capability, row.spec)

    def claimed_jobs(self, worker: str) -> list[str]:
        return [job_id for job_id, owner in list(self._claimed.items()) if owner == worker]

    def interrupt(self, job_id: str, reason: str, *, worker: str | None = None, lease_expired_before=None) -> bool:  # noqa: ANN001
        """A running job whose worker is gone (or stopping) fails with INTERRUPTED; it never runs twice."""
        done = self._transition(job_id, JobState.FAILED, to_status(Interrupted(reason)), expect=JobState.RUNNING,
                                worker=worker, lease_expired_before=lease_expired_before)
        if done or worker is not None:
            # A refused compare-and-set with no worker named is the janitor finding the lease renewed
            # meanwhile: the job is still this process's to renew, so it stays claimed.
            self._claimed.pop(job_id, None)
        if done:
            log.warning("job %s interrupted: %s", job_id, reason)
        return done

    def _janitor_loop(self) -> None:
        """Shared mode, in every process: fail jobs whose lease ran out; strip old previews."""
        period = max(0.2, min(1.0, self.lease_seconds / 5))
        while not self._stopping.wait(period):
            try:
                moment = st.now()
                for job_id in self.store.expired(moment):
                    self.interrupt(job_id, "its worker stopped renewing its lease (it died or lost the database)",
                                   lease_expired_before=moment)
                self.strip_ended_previews()
            except Exception as exc:  # the database is away: try again next period
                log.warning("janitor: %s", exc)

    def strip_ended_previews(self, older_than: float = LIVE_LOG_S) -> None:
        """Strip the preview pixels of jobs that ended ``older_than`` seconds ago (the janitor's job)."""
        for job_id in self.store.ended_with_previews(st.now() - timedelta(seconds=older_than)):
            self.store.strip_previews(job_id, _without_jpeg)

    # -- the event thread ------------------------------------------------------------------
    def _pump(self) -> None:
        """Record what workers send, in arrival order. Messages that arrived together (a job's
        last output and its finish, a step's progress and preview, several workers' reports)
        commit as one transaction: one commit and one wake-up of the serving loop for all."""
        while True:
            batch = [self._inbox.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            messages = [m for m in batch if m is not None]
            try:
                self._record(messages, {id(m): self._output_of(m) for m in messages if isinstance(m, msg.Output)})
            except Exception:  # never: _record reports its failures; but this thread must not die
                log.exception("could not record %d messages", len(messages))
            if len(messages) < len(batch):  # stop() was called
                return

    def _record(self, batch: list[msg.Message], outputs: dict[int, job_pb2.JobOutput | None]) -> None:
        """Store ``batch`` in one transaction, then publish its events; ``outputs`` holds each
        Output message's JobOutput, its image already stored (None: storing it failed)."""
        began = time.monotonic()
        while True:
            try:
                stored = self._commit(batch, outputs)
                break
            except Exception as exc:  # a store failure must not stop the events of other jobs
                if st.is_connection_error(exc) and time.monotonic() - began < STORE_RETRY_S:
                    log.warning("database unreachable recording %d messages; retrying", len(batch))
                    time.sleep(0.5)  # the transaction rolled back, and its moves are compare-and-set: retrying is safe
                    continue
                if len(batch) == 1:
                    log.exception("could not record %s", type(batch[0]).__name__)
                    return
                for message in batch:  # one message the store refuses must not lose the others
                    self._record([message], outputs)
                return
        for message, event in stored:
            if isinstance(message, msg.Started) and event is not None:
                log.info("job %s %s started", message.job_id, self._active[message.job_id].capability)
            elif isinstance(message, msg.Finished):
                self._finished(message, event)

    def _commit(self, batch: list[msg.Message], outputs: dict[int, job_pb2.JobOutput | None]
                ) -> list[tuple[msg.Message, job_pb2.JobEvent | None]]:
        """One transaction for ``batch``; once it commits, its events are published, watchers woken once."""
        with self._emit_lock:
            with self.store.begin() as conn:
                stored = [(m, self._write(conn, m, outputs)) for m in batch]
            woken = {}
            for message, event in stored:
                if event is not None and (job := self._publish(message.job_id, event)) is not None:
                    woken[id(job)] = job
            self._wake(*woken.values())
        return stored

    def _write(self, conn: Connection, message: msg.Message, outputs: dict[int, job_pb2.JobOutput | None]
               ) -> job_pb2.JobEvent | None:
        """Store one message's writes in ``conn``'s transaction; returns its event to publish."""
        job_id = message.job_id
        if isinstance(message, msg.Started):
            return self._move(conn, job_id, JobState.RUNNING, None, expect=JobState.QUEUED)
        if isinstance(message, msg.Progress):
            return self._append(conn, job_id, "progress", job_pb2.JobProgress(
                step=message.step, total_steps=message.total, stage=message.stage, model=message.model))
        if isinstance(message, msg.Preview):
            return self._append(conn, job_id, "preview", job_pb2.JobPreview(jpeg=message.jpeg, step=message.step))
        if isinstance(message, msg.Output):
            output = outputs[id(message)]
            if output is None:
                return None
            # None when its lease ran out and the job failed meanwhile: a result nobody will read.
            event = self._append(conn, job_id, "output", output)
            if event is not None:
                self.store.add_output(conn, job_id, output.index, output.SerializeToString())
            return event
        error = message.error or self._output_errors.get(job_id)
        state = (JobState.SUCCEEDED if error is None
                 else JobState.CANCELLED if error.code == CANCELLED_CODE else JobState.FAILED)
        return self._move(conn, job_id, state, error, expect=JobState.RUNNING, worker=self._claimed.get(job_id))

    def _output_of(self, message: msg.Output) -> job_pb2.JobOutput | None:
        """Store an output's image (encoding it as PNG) and build its JobOutput, outside any
        transaction; None when storing failed (the job then fails with that error)."""
        output = job_pb2.JobOutput(index=message.index, seed=message.seed,
                                   parameters=json.dumps(message.parameters, sort_keys=True))
        try:
            info = message.asset
            if message.image is not None:
                info = self.assets.put_image(message.image, message.parameters)
        except Exception as exc:  # the job fails with this error rather than succeed without its output
            if not isinstance(exc, PalettaError):
                log.exception("could not store output %d of %s", message.index, message.job_id)
                exc = PalettaError(f"storing output {message.index} failed: {type(exc).__name__}: {exc}"[:1000])
            self._output_errors[message.job_id] = to_status(exc)
            return None
        if info is not None:
            output.asset.CopyFrom(image_pb2.Asset(name=info.name, mime=info.mime, width=info.width,
                                                  height=info.height, size_bytes=info.size_bytes))
        if message.result_type:
            getattr(output, RESULT_FIELDS[message.result_type]).ParseFromString(message.result)
        return output

    def _finished(self, message: msg.Finished, event: job_pb2.JobEvent | None) -> None:
        """After a Finished message is recorded and its event published (None: its lease was lost)."""
        error = message.error or self._output_errors.pop(message.job_id, None)
        self._claimed.pop(message.job_id, None)
        if event is not None:
            self._ended(message.job_id)
        state = JobState(STATE_NAMES[event.finished.job.state]) if event is not None else None
        log.info("job %s %s in %.2f s%s", message.job_id, state.value.lower() if state else "not recorded (lease lost)",
                 message.seconds, f" ({error.message})" if error is not None and state == JobState.FAILED else "")


def job_not_found(job_id: str) -> NotFound:
    """NOT_FOUND for a job, with the request field that named it (``name`` in every job RPC)."""
    text = f"job {job_name(job_id)} does not exist"
    return NotFound(text, reason="JOB_NOT_FOUND", violations=[FieldViolation("name", text)])


def _queue_full(max_queue: int) -> ResourceExhausted:
    return ResourceExhausted(f"the queue is full ({max_queue} jobs); retry later",
                             reason="QUEUE_FULL", retry_after_s=5.0)


def _wake_all(jobs: tuple[ActiveJob, ...]) -> None:
    for job in jobs:
        job.wake()


def _without_jpeg(data: bytes) -> bytes:
    event = job_pb2.JobEvent.FromString(data)
    event.preview.ClearField("jpeg")
    return event.SerializeToString()


def _parse(data: bytes) -> job_pb2.JobEvent:
    return job_pb2.JobEvent.FromString(data)
