"""One request's jobs in the scheduler: queued together, read from one queue, ended together.

OpenAI's `/v1/completions` takes several prompts in one request, and each becomes a job of its own, yet they share
one fate (TGI drops a request's other generations when one fails). `Runtime.generate_all` validates every prompt
before any job is queued; afterwards every job emits into this one queue of the event loop, tagged with its prompt's
index, so the reader meets the first failure whichever prompt it came from, and the request's end, however it comes
(a failure, the client leaving, the last step), cancels every job still scheduled. A request of one prompt is the
same with one job.
"""

from __future__ import annotations

import asyncio
import time
from enum import Enum
from typing import Callable

from serving.decoding import Job, Step
from serving.schemas import ApiError

# What a client reads when the model fails; the exception and its traceback go to the server's log only.
GENERATION_FAILED = "Request failed during generation: Server error: the model failed on this request"


class JobState(Enum):
    """Where one prompt's job stands, as the event loop sees it."""

    SCHEDULED = "scheduled"  # queued or running in the scheduler
    FINISHED = "finished"  # its last step has arrived
    FAILED = "failed"  # the scheduler reported its error, and dropped it
    CANCELLED = "cancelled"  # its request ended first; the scheduler drops it


class RequestJobs:
    """The jobs of one request, their states, and the queue their steps arrive on."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.out: asyncio.Queue[tuple[int, Step | Exception]] = asyncio.Queue()
        self.jobs: list[Job] = []
        self.states: list[JobState] = []
        self.start = time.perf_counter()

    def emitter(self, index: int) -> Callable[[Step | Exception], None]:
        """What prompt `index`'s job emits with, from the scheduler's thread."""
        return lambda item: self.loop.call_soon_threadsafe(self.out.put_nowait, (index, item))

    def add(self, job: Job) -> None:
        self.jobs.append(job)
        self.states.append(JobState.SCHEDULED)

    def scheduled(self) -> bool:
        return JobState.SCHEDULED in self.states

    def count(self, state: JobState) -> int:
        return self.states.count(state)

    async def next(self) -> tuple[int, Step]:
        """The next step of any job, with its prompt's index; a job's failure fails the request."""
        index, item = await self.out.get()
        if isinstance(item, Exception):  # the scheduler logged it with its traceback; the client gets TGI's words
            self.states[index] = JobState.FAILED
            raise ApiError(424, GENERATION_FAILED, "generation")
        if item.end is not None:
            self.states[index] = JobState.FINISHED
        return index, item

    def cancel(self) -> list[Job]:
        """Mark the jobs still scheduled cancelled, and return them for the scheduler to drop."""
        cancelled = [job for job, state in zip(self.jobs, self.states) if state is JobState.SCHEDULED]
        self.states = [JobState.CANCELLED if state is JobState.SCHEDULED else state for state in self.states]
        return cancelled
