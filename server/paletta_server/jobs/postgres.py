"""PostgreSQL specifics of the shared job queue: LISTEN for the store's notifications, and the
``PostgresLink`` — the WorkerLink (jobs/messages.py) of a device worker that claims its jobs from
the shared store instead of an in-process queue.

The link reports through a JobManager in the worker's own process (the same recorder, state
machine and store code the embedded server uses); it adds what a worker far from its front ends
needs: claiming with ``FOR UPDATE SKIP LOCKED`` (wakened by ``NOTIFY paletta_queue``), a lease it
renews with a heartbeat while it runs a job, and a cancel flag it polls between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import psycopg
from sqlalchemy import make_url

from paletta_server.jobs import messages as msg
from paletta_server.jobs import store as st
from paletta_server.jobs.manager import JobManager

log = logging.getLogger(__name__)
CANCEL_POLL_S = 0.02  # the cancel flag is read at most this often (a real step takes longer)
RECONNECT_S = 0.5


def libpq_url(url: str) -> str:
    """The SQLAlchemy URL (postgresql+psycopg://…) as psycopg's conninfo (postgresql://…)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def listen(url: str, channel: str, on_notify: Callable[[str], None], on_connect: Callable[[], None]) -> None:
    """Call ``on_notify(job id)`` for each notification on ``channel``, for ever: after a lost
    connection (a PostgreSQL restart) reconnect and call ``on_connect`` so the caller can catch up."""
    conninfo = libpq_url(url)
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                await conn.execute(f"LISTEN {channel}")
                on_connect()
                async for note in conn.notifies():
                    on_notify(note.payload.split(":", 1)[0])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("LISTEN %s: %s; reconnecting", channel, exc)
            await asyncio.sleep(RECONNECT_S)


def worker_name(device: str) -> str:
    """host:pid:device — unique among live workers, readable in the jobs table."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{device}"[:64]


class PostgresLink:
    """messages.WorkerLink over the shared store, for one device worker."""

    def __init__(self, manager: JobManager, worker: str):
        self.manager = manager
        self.store = manager.store
        self.worker = worker
        self._conninfo = libpq_url(self.store.url)
        self._listener: psycopg.Connection | None = None
        self._cancel_checked: dict[str, float] = {}
        self._cancelled: set[str] = set()
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="paletta-lease", daemon=True)

    def start(self) -> None:
        self._heartbeat.start()

    def stop(self) -> None:
        """After the worker stopped and the manager recorded what it sent: a job still running here
        fails as INTERRUPTED now, rather than when its lease runs out."""
        self._stop.set()
        for job_id in self.store.running_on(self.worker):
            self.manager.interrupt(job_id, "its worker stopped while it ran", worker=self.worker)
        if self._listener is not None:
            self._listener.close()

    # -- WorkerLink ------------------------------------------------------------------------
    def next_assignment(self, stop: threading.Event, resident: Callable[[str], bool],
                        timeout: float = 0.5) -> msg.Assignment | None:
        try:
            assignment = self.manager.claim(self.worker, resident)
            if assignment is None and not stop.is_set():
                self._wait_for_queue(timeout)
                assignment = None if stop.is_set() else self.manager.claim(self.worker, resident)
            return assignment
        except Exception as exc:  # the database is away: the device waits, the loop asks again
            log.warning("claim: %s", exc)
            self._drop_listener()
            time.sleep(min(timeout, RECONNECT_S))
            return None

    def send(self, message: msg.Message) -> None:
        if isinstance(message, msg.Started):
            return  # the claim already moved the job to RUNNING and stored its `started`
        if isinstance(message, msg.Finished):
            self._cancel_checked.pop(message.job_id, None)
            self._cancelled.discard(message.job_id)
        self.manager.send(message)

    def cancel_requested(self, job_id: str) -> bool:
        if job_id in self._cancelled:
            return True
        moment = time.monotonic()
        if moment - self._cancel_checked.get(job_id, 0.0) < CANCEL_POLL_S:
            return False
        self._cancel_checked[job_id] = moment
        try:
            if self.store.cancel_flag(job_id):
                self._cancelled.add(job_id)
                return True
        except Exception as exc:
            log.warning("cancel flag of %s: %s", job_id, exc)
        return False

    # -- waiting and the lease --------------------------------------------------------------
    def _wait_for_queue(self, timeout: float) -> None:
        """Sleep until a job is queued anywhere (NOTIFY paletta_queue) or ``timeout`` passes."""
        if self._listener is None:
            self._listener = psycopg.connect(self._conninfo, autocommit=True)
            self._listener.execute(f"LISTEN {st.QUEUE_CHANNEL}")
        for _ in self._listener.notifies(timeout=timeout, stop_after=1):
            pass

    def _drop_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):  # already broken
                self._listener.close()
            self._listener = None

    def _heartbeat_loop(self) -> None:
        period = self.manager.lease_seconds / 5
        while not self._stop.wait(period):
            jobs = self.manager.claimed_jobs(self.worker)
            if not jobs:
                continue
            try:
                self.store.heartbeat(self.worker, jobs, st.now() + timedelta(seconds=self.manager.lease_seconds))
            except Exception as exc:  # the lease outlives a short outage; a long one fails the job
                log.warning("lease heartbeat: %s", exc)
