"""Job store on SQLite through SQLAlchemy: jobs, what they were asked, and every event with its seq.

The contract is the record format: a job's spec is a serialized ``paletta.v1.JobSpec``, its error
a serialized ``google.rpc.Status``, its events serialized ``paletta.v1.JobEvent`` messages, so
replaying after a restart returns exactly what live watchers saw.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    and_,
    create_engine,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from paletta_server.jobs.state import FINAL, JobState


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


def _set_aside_older_schema(engine, path: Path) -> None:  # noqa: ANN001
    """A store written before jobs kept their spec (the pre-release schema) is renamed, not lost."""
    if "jobs" in inspect(engine).get_table_names() and "spec" not in {
            c["name"] for c in inspect(engine).get_columns("jobs")}:
        engine.dispose()
        aside = path.with_suffix(".pre-spec.db")
        path.rename(aside)
        logging.getLogger(__name__).warning("job store %s has an older schema; kept as %s, starting a new one",
                                            path, aside)


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class JobStore:
    """Thread-safe: one lock serialises writes; SQLite runs in WAL mode so readers don't block."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False})

        @event.listens_for(self.engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL: a commit survives a process crash (kill -9); only power loss may lose the last.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.close()

        _set_aside_older_schema(self.engine, path)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._lock = threading.Lock()

    def session(self) -> Session:
        return self._sessions()

    # -- jobs ----------------------------------------------------------------------------
    def create(self, capability: str, spec: bytes, priority: int, request_id: str, model_key: str,
               cancel_on_disconnect: bool) -> JobRow:
        row = JobRow(
            id=uuid.uuid4().hex, capability=capability, state=JobState.QUEUED.value, priority=priority,
            request_id=request_id or None, spec=spec, model_key=model_key,
            cancel_on_disconnect=cancel_on_disconnect, created=now(),
        )
        with self._lock, self.session() as s:
            s.add(row)
            s.commit()
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

    def set_state(self, job_id: str, state: JobState, *, error: bytes | None = None) -> JobRow:
        """Write a state the manager's state machine has checked; ``error`` is a serialized Status."""
        values: dict = {"state": state.value}
        if state == JobState.RUNNING:
            values["started"] = now()
        if state in FINAL:
            values["ended"] = now()
        if error is not None:
            values["error"] = error
        jobs = JobRow.__table__
        with self._lock, self.engine.begin() as conn:  # Core: on every job's path, twice
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
        row = self.get(job_id)
        assert row is not None
        return row

    # -- events --------------------------------------------------------------------------
    def append_event(self, job_id: str, kind: str, build) -> tuple[int, bytes]:
        """Assign the next seq, let ``build(seq)`` serialise the event, persist it; return (seq, bytes).

        The hot path of every progress event, so it uses SQLAlchemy Core in one short transaction
        (an ORM session costs ~30x more per event).
        """
        jobs, events = JobRow.__table__, EventRow.__table__
        with self._lock, self.engine.begin() as conn:
            seq = conn.execute(
                update(jobs).where(jobs.c.id == job_id).values(last_seq=jobs.c.last_seq + 1)
                .returning(jobs.c.last_seq)
            ).scalar_one()
            data = build(seq)
            conn.execute(insert(events).values(job_id=job_id, seq=seq, kind=kind, data=data))
            return seq, data

    def strip_previews(self, job_id: str, strip: Callable[[bytes], bytes]) -> int:
        """Rewrite a finished job's preview events with ``strip`` (drops their pixels); returns how many."""
        events = EventRow.__table__
        with self._lock, self.engine.begin() as conn:
            rows = conn.execute(select(events.c.seq, events.c.data).where(
                events.c.job_id == job_id, events.c.kind == "preview")).all()
            for seq, data in rows:
                conn.execute(update(events).where(events.c.job_id == job_id, events.c.seq == seq)
                             .values(data=strip(data)))
            return len(rows)

    def events_after(self, job_id: str, after_seq: int) -> list[bytes]:
        with self.session() as s:
            query = (select(EventRow.data).where(EventRow.job_id == job_id, EventRow.seq > after_seq)
                     .order_by(EventRow.seq))
            return list(s.scalars(query))

    # -- outputs -------------------------------------------------------------------------
    def add_output(self, job_id: str, index: int, data: bytes) -> None:
        outputs = OutputRow.__table__
        with self._lock, self.engine.begin() as conn:
            conn.execute(insert(outputs).values(job_id=job_id, index=index, data=data, approved=False))

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

    def count(self, state: JobState | str) -> int:
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(JobRow).where(JobRow.state == JobState(state).value)) or 0
