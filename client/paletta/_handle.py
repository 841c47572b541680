"""What the sync and async job handles share: their state, read from the follower, and typed results."""

from __future__ import annotations

from typing import Generic, TypeVar, cast

import grpc

from paletta._follow import JobFollower
from paletta.errors import PalettaError
from paletta.results import result_of
from paletta.v1 import job_pb2

R = TypeVar("R")


class HandleBase(Generic[R]):
    """State of a job handle; ``R`` is the type of the job's typed results."""

    _core: JobFollower

    @property
    def name(self) -> str:
        """The job's resource name, "jobs/{id}" (empty until the server has answered)."""
        return self._core.name

    @property
    def last_seq(self) -> int:
        """The seq of the last event seen; re-attaching replays from here."""
        return self._core.last_seq

    @property
    def done(self) -> bool:
        """Whether the job's end has been seen."""
        return self._core.done

    @property
    def job(self) -> job_pb2.Job | None:
        """The final Job once finished, else None."""
        return self._core.final

    @property
    def reattach_count(self) -> int:
        """How many times the handle re-attached after a dropped stream."""
        return self._core.reattach_count

    def __repr__(self) -> str:
        final = self._core.final
        state = job_pb2.JobState.Name(final.state).removeprefix("JOB_STATE_").lower() if final else "open"
        return f"<{type(self).__name__} {self.name or '(not submitted)'} {state} seq={self.last_seq}>"

    def _typed_results(self) -> list[R]:
        """The typed results of every output of the finished job (raises JobFailed unless it succeeded)."""
        self._core.check()
        results = (result_of(o) for o in self._core.outputs_in_order())
        return cast(list[R], [r for r in results if r is not None])

    def _first_result(self) -> R:
        results = self._typed_results()
        if not results:
            raise PalettaError(f"job {self.name} has no typed result", code=grpc.StatusCode.NOT_FOUND)
        return results[0]

    def _no_image(self) -> PalettaError:
        return PalettaError(f"job {self.name} has no image output", code=grpc.StatusCode.NOT_FOUND)


def image_asset(output: job_pb2.JobOutput) -> str | None:
    """The asset name of an image output, None for a text-only one."""
    return output.asset.name if output.HasField("asset") and output.asset.name else None
