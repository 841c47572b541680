"""The one job state machine: the states a job can be in and the moves between them.

Every state change goes through ``JobManager._transition``, which checks it here, persists it
and emits its event; nothing else writes a job's state.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# QUEUED → FAILED happens when a restart finds a job it can no longer run; RUNNING → QUEUED never:
# a job interrupted by a crash fails (INTERRUPTED) rather than running twice.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: FINAL,
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A bug: something tried to move a job along an edge the state machine does not have."""


def check_transition(job_id: str, old: JobState, new: JobState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"job {job_id}: {old} → {new} is not a job state transition")
