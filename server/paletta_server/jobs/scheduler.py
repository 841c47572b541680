"""Pure queue logic: which queued job runs next. No I/O, no threads, no models.

Order is priority (high first), then arrival. Within a bounded look-ahead the scheduler may
take a later job of the same effective priority whose model is already resident, saving a
load; a job passed over ``max_skips`` times runs next regardless. Every pass-over also ages
the job, and each ``max_skips`` pass-overs raise its effective priority by one, so a low
priority job cannot starve behind a stream of higher ones. With several workers, each worker's
claim runs this same policy over the head of the shared queue it locked (jobs/store.py ``claim``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class QueuedJob:
    job_id: str
    priority: int
    model_key: str
    arrival: int = 0
    skips: int = field(default=0)


class Scheduler:
    def __init__(self, lookahead: int = 4, max_skips: int = 3):
        self.lookahead = lookahead
        self.max_skips = max_skips
        self._queue: dict[str, QueuedJob] = {}
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._queue

    def add(self, job_id: str, priority: int, model_key: str, skips: int = 0) -> None:
        """Queue a job behind those added before it (``skips``: times it was already passed over)."""
        self._queue[job_id] = QueuedJob(job_id, priority, model_key, next(self._arrivals), skips)

    def remove(self, job_id: str) -> bool:
        return self._queue.pop(job_id, None) is not None

    def effective_priority(self, job: QueuedJob) -> int:
        return job.priority + job.skips // self.max_skips

    def ordered(self) -> list[QueuedJob]:
        return sorted(self._queue.values(), key=lambda j: (-self.effective_priority(j), j.arrival))

    def position(self, job_id: str) -> int:
        """Zero-based place in the current order (what a queued event reports)."""
        return next((i for i, j in enumerate(self.ordered()) if j.job_id == job_id), -1)

    def pick(self, is_resident: Callable[[str], bool]) -> str | None:
        """Remove and return the next job to run, or None when the queue is empty."""
        order = self.ordered()
        if not order:
            return None
        head = order[0]
        chosen = head
        if head.skips < self.max_skips and not is_resident(head.model_key):
            head_priority = self.effective_priority(head)
            for candidate in order[1 : 1 + self.lookahead]:
                if self.effective_priority(candidate) < head_priority:
                    break
                if is_resident(candidate.model_key):
                    chosen = candidate
                    break
        # Whoever arrived earlier than the chosen job and still waits was passed over.
        for job in order:
            if job is not chosen and job.arrival < chosen.arrival:
                job.skips += 1
        del self._queue[chosen.job_id]
        return chosen.job_id
