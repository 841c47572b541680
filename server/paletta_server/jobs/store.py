"""The job store, by URL: SQLite (the embedded default) or PostgreSQL (scale-out), one schema, one code.

Jobs, what they were asked, and every event with its seq. The contract is the record format: a
job's spec is a serialized ``paletta.v1.JobSpec``, its error a serialized ``google.rpc.Status``,
its events serialized ``paletta.v1.JobEvent`` messages, so replaying after a restart returns
exactly what live watchers saw. The schema is Alembic's (jobs/migrations), brought to head at start.

On PostgreSQL the store is also the queue shared by every process: a worker claims a job with
``FOR UPDATE SKIP LOCKED`` (``claim``), holds a lease it renews (``heartbeat``), and every event is
announced with ``NOTIFY paletta_events '<job id>:<seq>'`` in the transaction that stores it (a
queued job also on ``paletta_queue``, for idle workers). On SQLite the same statements run without
the row locks and the notifications: one process owns the file.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    and_,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    inspect,
    make_url,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from paletta_server.jobs.state import FINAL, JobState

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
EVENTS_CHANNEL = "paletta_events"  # payload "<job id>:<seq>": a new event is stored
QUEUE_CHANNEL = "paletta_queue"  # payload "<job id>": a job was queued
_MIGRATION_LOCK = 0x7061_6C65  # pg_advisory_xact_lock key: one process migrates at a time
_FINAL = [s.value for s in FINAL]


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    capability: Mapped[str] = mapped_column(String(32), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[int] = mapped_column(Integer)
    request_id: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)
    spec: Mapped[bytes] = mapped_column(LargeBinary)  # serialized paletta.v1.JobSpec
    model_key: Mapped[str] = mapped_column(String(64), default="")
    cancel_on_disconnect: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[datetime] = mapped_column(DateTime, index=True)
    started: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    ended: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    error: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # serialized google.rpc.Status
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    # -- the shared queue (migration 0002) --
    worker: Mapped[str | None] = mapped_column(String(64), nullable=True)  # who runs it
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # … while it renews this
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    skips: Mapped[int] = mapped_column(Integer, default=0)  # times passed over (the scheduler's aging)
    previews_stripped: Mapped[bool] = mapped_column(Boolean, default=False)


class EventRow(Base):
    __tablename__ = "events"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[bytes] = mapped_column(LargeBinary)


class OutputRow(Base):
    __tablename__ = "outputs"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)  # serialized JobOutput
    approved: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    approved_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


# (the event's seq, the job row after the change and its outputs — loaded for a final state only;
# a claim gives the claimed row as it was queued) → the serialized event
MakeEvent = Callable[[int, JobRow | None, list[OutputRow]], bytes]
# the claim's candidates, in queue order → (the chosen job, new skips of the others)
PickJob = Callable[[list[JobRow]], tuple[str, dict[str, int]]]


_JOBS, _EVENTS, _OUTPUTS = JobRow.__table__, EventRow.__table__, OutputRow.__table__
# Every event's statements, built once (SQLAlchemy then only looks up their compiled form): the
# next seq of a job that is not over, and the event's row.
_NEXT_SEQ = (update(_JOBS).where(_JOBS.c.id == bindparam("job_id"), *(_JOBS.c.state != state for state in _FINAL))
             .values(last_seq=_JOBS.c.last_seq + 1).returning(_JOBS.c.last_seq))
_ADD_EVENT = insert(_EVENTS)
_ADD_JOB = insert(_JOBS)
# Storing an output again (a retry after a lost connection) changes nothing.
_ADD_OUTPUT = {"sqlite": sqlite.insert(_OUTPUTS).on_conflict_do_nothing(),
               "postgresql": postgresql.insert(_OUTPUTS).on_conflict_do_nothing()}
_JOB = select(_JOBS).where(_JOBS.c.id == bindparam("job_id"))
_OUTPUTS_OF = select(_OUTPUTS).where(_OUTPUTS.c.job_id == bindparam("job_id")).order_by(_OUTPUTS.c.index)


@functools.cache
def _move_statement(started: bool, ended: bool, error: bool, worker: bool, lease: bool) -> Any:
    """A state change's statement, built once per shape: the job moves from ``:expect`` to ``:new``
    (if ``worker``, only while ``:by_worker`` holds it; if ``lease``, only if its lease ran out before
    ``:lease_expired_before``), setting started / ended to ``:now`` and its error to ``:error_status``;
    returns the new seq."""
    jobs = _JOBS
    values: dict[str, Any] = {"state": bindparam("new"), "last_seq": jobs.c.last_seq + 1}
    if started:
        values["started"] = bindparam("now")
    if ended:
        values["ended"] = bindparam("now")
    if error:
        values["error"] = bindparam("error_status")
    where = [jobs.c.id == bindparam("job_id"), jobs.c.state == bindparam("expect")]
    if worker:
        where.append(jobs.c.worker == bindparam("by_worker"))
    if lease:
        where.append(jobs.c.lease_until < bindparam("lease_expired_before"))
    return update(jobs).where(*where).values(**values).returning(jobs.c.last_seq)


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def database_url(database: str, data_dir: Path) -> str:
    """The store's SQLAlchemy URL: ``database`` as given, or SQLite in the data dir when empty."""
    return database or f"sqlite:///{data_dir / 'paletta.db'}"


def is_connection_error(exc: BaseException) -> bool:
    """A lost or refused database connection (a PostgreSQL restart): worth retrying, not a bug."""
    return isinstance(exc, DBAPIError) and (exc.connection_invalidated or type(exc.orig).__name__ in (
        "OperationalError", "InterfaceError", "AdminShutdown", "ConnectionFailure"))


def _set_aside_older_schema(engine, path: Path) -> None:  # noqa: ANN001
    """A store written before jobs kept their spec (the pre-release schema) is renamed, not lost."""
    if "jobs" in inspect(engine).get_table_names() and "spec" not in {
            c["name"] for c in inspect(engine).get_columns("jobs")}:
        engine.dispose()
        aside = path.with_suffix(".pre-spec.db")
        path.rename(aside)
        log.warning("job store %s has an older schema; kept as %s, starting a new one", path, aside)


def migrate(engine) -> None:  # noqa: ANN001
    """Bring the schema to Alembic's head; a store made before migrations (no version table) is
    recognised as revision 0001 first."""
    # Alembic narrates every plugin (at import) and step at INFO; the server's log keeps one line per job.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # processes starting together migrate one after another
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        cfg.attributes["connection"] = conn
        tables = set(inspect(conn).get_table_names())
        if "jobs" in tables and "alembic_version" not in tables:
            command.stamp(cfg, "0001")
        command.upgrade(cfg, "head")


class JobStore:
    """Thread-safe. On SQLite one lock serialises writes (WAL mode: readers don't block); on
    PostgreSQL transactions and row locks do, across processes."""

    def __init__(self, url: str | Path):
        if isinstance(url, Path):
            url = f"sqlite:///{url}"
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self.shared = self.dialect == "postgresql"
        if self.shared:
            # pre-ping: after a PostgreSQL restart, stale pooled connections are replaced, not used
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=24)
            self._lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        else:
            path = Path(parsed.database or "")
            path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(url, connect_args={"check_same_thread": False})

            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _record):  # noqa: ANN001
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL: a commit survives a process crash (kill -9); only power loss may lose the last.
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA busy_timeout=5000")
                cur.close()

            _set_aside_older_schema(self.engine, path)
            self._lock = threading.Lock()
        migrate(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._writer: Connection | None = None  # SQLite: the connection writes take turns on (see begin)

    def session(self) -> Session:
        return self._sessions()

    def dispose(self) -> None:
        with self._lock:
            writer, self._writer = self._writer, None
            if writer is not None:
                writer.close()
        self.engine.dispose()

    def _notify(self, conn: Connection | Session, job_id: str, seq: int, kind: str) -> None:
        """Announce an event (delivered when the transaction commits; PostgreSQL only)."""
        if self.shared:
            conn.execute(select(func.pg_notify(EVENTS_CHANNEL, f"{job_id}:{seq}")))
            if kind == "queued":
                conn.execute(select(func.pg_notify(QUEUE_CHANNEL, job_id)))

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """One write transaction: the writes below take its connection, so several of them commit
        together or not at all. On SQLite, writes take turns under the store's lock, on one
        connection kept for them (checking a pooled one out and in was Python work on every event)."""
        if self.shared:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._lock:
            if self._writer is None:
                self._writer = self.engine.connect()
            try:
                with self._writer.begin():
                    yield self._writer
            except BaseException:  # rolled back; the next write starts on a fresh connection
                writer, self._writer = self._writer, None
                writer.close()
                raise

    # -- jobs ----------------------------------------------------------------------------
    def create(self, conn: Connection, capability: str, spec: bytes, priority: int, request_id: str,
               model_key: str, cancel_on_disconnect: bool) -> JobRow:
        """Raises IntegrityError when ``request_id`` is taken (another front end won the race)."""
        row = JobRow(
            id=uuid.uuid4().hex, capability=capability, state=JobState.QUEUED.value, priority=priority,
            request_id=request_id or None, spec=spec, model_key=model_key,
            cancel_on_disconnect=cancel_on_disconnect, created=now(), last_seq=0, cancel_requested=False,
            skips=0, previews_stripped=False, worker=None, lease_until=None, started=None, ended=None, error=None,
        )
        conn.execute(_ADD_JOB, {c.name: getattr(row, c.name) for c in _JOBS.c})
        return row

    def get(self, job_id: str) -> JobRow | None:
        with self.session() as s:
            return s.get(JobRow, job_id)

    def by_request_id(self, request_id: str) -> JobRow | None:
        with self.session() as s:
            return s.scalars(select(JobRow).where(JobRow.request_id == request_id)).first()

    def list(self, states: list[str], capability: str, after: tuple[datetime, str] | None, limit: int
             ) -> list[JobRow]:
        """Newest first; ``after`` is (created, id) of the last job of the previous page."""
        query = select(JobRow).order_by(JobRow.created.desc(), JobRow.id.desc())
        if states:
            query = query.where(JobRow.state.in_(states))
        if capability:
            query = query.where(JobRow.capability == capability)
        if after is not None:
            created, job_id = after
            query = query.where(or_(JobRow.created < created, and_(JobRow.created == created, JobRow.id < job_id)))
        with self.session() as s:
            return list(s.scalars(query.limit(limit)))

    def in_state(self, state: JobState) -> list[JobRow]:
        with self.session() as s:
            return list(s.scalars(select(JobRow).where(JobRow.state == state.value).order_by(JobRow.created)))

    def count(self, state: JobState | str) -> int:
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(JobRow).where(JobRow.state == JobState(state).value)) or 0

    def position(self, conn: Connection, row: JobRow, max_skips: int) -> int:
        """Jobs before this queued one: those running, and those queued ahead of it."""
        jobs = JobRow.__table__
        effective = jobs.c.priority + jobs.c.skips // max_skips
        mine = row.priority + row.skips // max_skips
        earlier = tuple_(jobs.c.created, jobs.c.id) < (row.created, row.id)
        ahead = or_(effective > mine, and_(effective == mine, earlier))
        query = select(func.count()).select_from(jobs).where(or_(
            jobs.c.state == JobState.RUNNING.value, and_(jobs.c.state == JobState.QUEUED.value, ahead)))
        return conn.execute(query).scalar_one()

    # -- the state machine's writes --------------------------------------------------------
    def transition(self, conn: Connection, job_id: str, new: JobState, expect: JobState, make_event: MakeEvent,
                   kind: str, *, error: bytes | None = None, worker: str | None = None,
                   lease_expired_before: datetime | None = None) -> bytes | None:
        """Move a job from ``expect`` to ``new`` (a move the manager's state machine has checked) and
        store its event, in ``conn``'s transaction; returns the event, or None when the job is no
        longer in ``expect`` (or no longer ``worker``'s, or its lease was renewed): another process
        moved it first."""
        params = {"job_id": job_id, "expect": expect.value, "new": new.value, "now": now(), "error_status": error,
                  "by_worker": worker, "lease_expired_before": lease_expired_before}
        statement = _move_statement(new == JobState.RUNNING, new in FINAL, error is not None, worker is not None,
                                    lease_expired_before is not None)
        seq = conn.execute(statement, params).scalar()
        if seq is None:
            return None
        data = make_event(seq, *self._job_of(conn, job_id)) if new in FINAL else make_event(seq, None, [])
        self._add_event(conn, job_id, seq, kind, data)
        return data

    def _job_of(self, conn: Connection, job_id: str) -> tuple[JobRow, list[OutputRow]]:
        row = JobRow(**conn.execute(_JOB, {"job_id": job_id}).one()._mapping)
        return row, [OutputRow(**r._mapping) for r in conn.execute(_OUTPUTS_OF, {"job_id": job_id})]

    def _add_event(self, conn: Connection, job_id: str, seq: int, kind: str, data: bytes) -> None:
        conn.execute(_ADD_EVENT, {"job_id": job_id, "seq": seq, "kind": kind, "data": data})
        self._notify(conn, job_id, seq, kind)

    def claim(self, worker: str, lease_until: datetime, pick: PickJob, make_event: MakeEvent, *,
              limit: int, max_skips: int) -> tuple[JobRow, bytes] | None:
        """Take one queued job for ``worker``: lock up to ``limit`` queued jobs in queue order
        (effective priority, then arrival) that no other claim holds, let ``pick`` choose among
        them (the scheduler's affinity look-ahead), and move the chosen one to RUNNING with its
        ``started`` event, in one transaction. Jobs that arrived before the chosen one age."""
        jobs, events = JobRow.__table__, EventRow.__table__
        effective = jobs.c.priority + jobs.c.skips // max_skips
        queued = and_(jobs.c.state == JobState.QUEUED.value, jobs.c.last_seq > 0)  # its `queued` event is stored
        with self._lock, self.session() as s, s.begin():
            candidates = list(s.scalars(
                select(JobRow).where(queued).order_by(effective.desc(), JobRow.created, JobRow.id)
                .limit(limit).with_for_update(skip_locked=True)))
            if not candidates:
                return None
            chosen_id, skips = pick(candidates)
            chosen = next(c for c in candidates if c.id == chosen_id)
            seq = s.execute(update(jobs).where(jobs.c.id == chosen_id).values(
                state=JobState.RUNNING.value, started=now(), worker=worker, lease_until=lease_until,
                last_seq=jobs.c.last_seq + 1).returning(jobs.c.last_seq)).scalar_one()
            for job in candidates:
                if job.id != chosen_id and skips.get(job.id, job.skips) != job.skips:
                    s.execute(update(jobs).where(jobs.c.id == job.id).values(skips=skips[job.id]))
            # Earlier arrivals outside the window (lower priority) were passed over too; one that
            # another claim holds right now misses this tick rather than making us wait.
            older = (select(jobs.c.id).where(queued, tuple_(jobs.c.created, jobs.c.id) < (chosen.created, chosen.id),
                                             jobs.c.id.not_in([c.id for c in candidates]))
                     .with_for_update(skip_locked=True))
            s.execute(update(jobs).where(jobs.c.id.in_(older.scalar_subquery())).values(skips=jobs.c.skips + 1))
            data = make_event(seq, chosen, [])
            s.execute(insert(events).values(job_id=chosen_id, seq=seq, kind="started", data=data))
            self._notify(s, chosen_id, seq, "started")
        return chosen, data

    def heartbeat(self, worker: str, job_ids: Sequence[str], lease_until: datetime) -> int:
        """Renew ``worker``'s lease on the jobs it runs; returns how many it still holds."""
        if not job_ids:
            return 0
        jobs = JobRow.__table__
        with self.begin() as conn:
            return conn.execute(update(jobs).where(
                jobs.c.worker == worker, jobs.c.id.in_(list(job_ids)), jobs.c.state == JobState.RUNNING.value,
            ).values(lease_until=lease_until)).rowcount

    def expired(self, before: datetime) -> list[str]:
        """Running jobs whose worker stopped renewing its lease (it died, or lost the database)."""
        jobs = JobRow.__table__
        with self.engine.connect() as conn:
            return list(conn.execute(select(jobs.c.id).where(
                jobs.c.state == JobState.RUNNING.value, jobs.c.lease_until < before)).scalars())

    def running_on(self, worker: str) -> list[str]:
        jobs = JobRow.__table__
        with self.engine.connect() as conn:
            return list(conn.execute(select(jobs.c.id).where(
                jobs.c.state == JobState.RUNNING.value, jobs.c.worker == worker)).scalars())

    def request_cancel(self, job_id: str) -> bool:
        """Raise the job's cancel flag (its worker polls it between steps); False once it is over."""
        jobs = JobRow.__table__
        with self.begin() as conn:
            return conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state.not_in(_FINAL))
                                .values(cancel_requested=True)).rowcount > 0

    def cancel_flag(self, job_id: str) -> bool:
        with self.engine.connect() as conn:
            return bool(conn.execute(select(JobRow.__table__.c.cancel_requested)
                                     .where(JobRow.__table__.c.id == job_id)).scalar())

    # -- events --------------------------------------------------------------------------
    def append_event(self, conn: Connection, job_id: str, kind: str, build: Callable[[int], bytes]) -> bytes | None:
        """Assign the next seq, let ``build(seq)`` serialise the event, store it in ``conn``'s
        transaction; returns the event, or None when the job is already over (a late message from
        a worker that lost its lease).

        The hot path of every progress event: prebuilt Core statements (an ORM session costs
        ~30x more per event, building the statements each time ~3x).
        """
        seq = conn.execute(_NEXT_SEQ, {"job_id": job_id}).scalar()
        if seq is None:
            return None
        data = build(seq)
        self._add_event(conn, job_id, seq, kind, data)
        return data

    def strip_previews(self, job_id: str, strip: Callable[[bytes], bytes]) -> int:
        """Rewrite a finished job's preview events with ``strip`` (drops their pixels); returns how many."""
        jobs, events = JobRow.__table__, EventRow.__table__
        with self.begin() as conn:
            rows = conn.execute(select(events.c.seq, events.c.data).where(
                events.c.job_id == job_id, events.c.kind == "preview")).all()
            for seq, data in rows:
                conn.execute(update(events).where(events.c.job_id == job_id, events.c.seq == seq)
                             .values(data=strip(data)))
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(previews_stripped=True))
            return len(rows)

    def ended_with_previews(self, before: datetime) -> list[str]:
        """Jobs that ended before ``before`` whose previews still carry pixels."""
        jobs = JobRow.__table__
        with self.engine.connect() as conn:
            return list(conn.execute(select(jobs.c.id).where(
                jobs.c.state.in_(_FINAL), jobs.c.ended < before, jobs.c.previews_stripped.is_(False))).scalars())

    def events_after(self, job_id: str, after_seq: int) -> list[bytes]:
        events = EventRow.__table__
        with self.engine.connect() as conn:
            return list(conn.execute(select(events.c.data).where(events.c.job_id == job_id, events.c.seq > after_seq)
                                     .order_by(events.c.seq)).scalars())

    # -- outputs -------------------------------------------------------------------------
    def add_output(self, conn: Connection, job_id: str, index: int, data: bytes) -> None:
        """Store one output; storing the same one again (a retry after a lost connection) is a no-op."""
        conn.execute(_ADD_OUTPUT[self.dialect], {"job_id": job_id, "index": index, "data": data, "approved": False})

    def outputs(self, job_id: str) -> list[OutputRow]:
        with self.session() as s:
            return list(s.scalars(select(OutputRow).where(OutputRow.job_id == job_id).order_by(OutputRow.index)))

    def set_approved(self, job_id: str, index: int, approved: bool) -> bool:
        with self._lock, self.session() as s:
            row = s.get(OutputRow, (job_id, index))
            if row is None:
                return False
            row.approved, row.approved_at = approved, (now() if approved else None)
            s.commit()
            return True

    def approved(self, after: tuple[datetime, str, int] | None, limit: int) -> list[tuple[JobRow, OutputRow]]:
        """Approved outputs, newest job first; ``after`` is (created, job id, index) of the previous page's last."""
        query = (select(JobRow, OutputRow).join(OutputRow, OutputRow.job_id == JobRow.id)
                 .where(OutputRow.approved.is_(True))
                 .order_by(JobRow.created.desc(), JobRow.id.desc(), OutputRow.index))
        if after is not None:
            created, job_id, index = after
            query = query.where(or_(
                JobRow.created < created,
                and_(JobRow.created == created, or_(JobRow.id < job_id,
                                                    and_(JobRow.id == job_id, OutputRow.index > index)))))
        query = query.limit(limit)
        with self.session() as s:
            return [(j, o) for j, o in s.execute(query)]
