"""The one job state machine: the states a job can be in and the moves between them.

Every state change is checked here: ``JobManager._transition`` checks, persists and emits it,
and in shared mode ``JobManager.claim`` (a worker taking a job from the PostgreSQL queue, QUEUED →
RUNNING with its ``started`` event in the claim's transaction) checks the same edge.
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

# RUNNING → QUEUED never: a job interrupted by a crash fails (INTERRUPTED) rather than running twice.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
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
