"""Continuous batching: one thread that admits waiting jobs into the running batch between decode steps.

Each turn (`step`) (1) admits waiting jobs while the batch has room (`schedule` decides, and names each job's state
with a RequestStatus), (2) prefills each alone and lets it join, (3) drops rows whose requests have ended, (4) decodes
one token for every row, (5) lets finished rows leave. A request that
arrives mid-generation therefore starts at the next step instead of waiting for the longest row of a static batch,
and a row whose request has ended (its client left, or a sibling prompt failed) stops within one step. The thread is
apart from the event loop, so the server keeps answering (health, 429s, streams) while the model computes.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

import torch

from serving.decode_batch import DecodeBatch
from serving.decoding import FINAL, Job, RequestStatus
from serving.engine import Engine

log = logging.getLogger(__name__)


class Scheduler:
    """Runs jobs on `engine`, at most `max_batch_size` rows at a time; `submit` may be called from any thread."""

    def __init__(self, engine: Engine, *, max_batch_size: int, threads: int = 1):
        self.engine, self.max_batch_size, self.threads = engine, max_batch_size, threads
        self.waiting: deque[Job] = deque()
        self.batch = DecodeBatch()
        self.wake = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="generate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def submit(self, *jobs: Job) -> None:
        """Queue a request's jobs, all validated, in one go: the scheduler's next turn sees all of them or none."""
        with self.wake:
            self.waiting.extend(jobs)
            self.wake.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """Drop the jobs of a request that has ended: waiting ones leave the queue now, running rows at the next
        step, and a job admitted this turn but not yet prefilled is skipped. A job already final stays as it is."""
        if not jobs:
            return
        with self.wake:
            for job in jobs:
                if job.status not in FINAL:
                    job.status = RequestStatus.CANCELLED
            self.waiting = deque(job for job in self.waiting if job.status is RequestStatus.WAITING)

    def queued(self) -> int:
        return len(self.waiting)

    def running(self) -> int:
        return len(self.batch)

    def close(self) -> None:
        """Stop after the current step; rows in flight are abandoned (their clients are gone with the server)."""
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join(timeout=30)

    def schedule(self) -> list[Job]:
        """Decide this turn's admissions, without waiting: the oldest waiting jobs, as many as the batch has room
        for. Each is RUNNING from here on, so a later cancel marks it, and `step` skips it."""
        with self.wake:
            room = self.max_batch_size - len(self.batch)
            admitted = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            for job in admitted:
                job.status = RequestStatus.RUNNING
            return admitted

    def step(self) -> None:
        """One turn, executed on the scheduler's thread (or a test's): drop rows whose requests have ended,
        prefill each admitted job and let it join, decode one token for every row, let finished rows leave."""
        for job in self.schedule():
            self._start(job)
        self.batch.keep([i for i, row in enumerate(self.batch.rows) if not row.done])
        if len(self.batch):
            self._decode()

    def _run(self) -> None:
        # On a shared CPU an OpenMP team stalls whenever one of its cores is busy elsewhere: measured here, a
        # decode step took 100 ms with 2 threads and 1 ms with 1. Batching, not intra-op threads, buys throughput.
        torch.set_num_threads(self.threads)
        while self._work():
            self.step()

    def _work(self) -> bool:
        """Wait until there is something to do; False once the scheduler is closed."""
        with self.wake:
            while not self.stopped and not self.waiting and not len(self.batch):
                self.wake.wait()
            return not self.stopped

    def _start(self, job: Job) -> None:
        if job.status is RequestStatus.CANCELLED:  # its request ended while it waited for the prefills before it
            return
        try:
            row, cache = self.engine.prefill(job)
            if not row.done:
                self.batch.join(row, cache)
        except Exception as err:  # noqa: BLE001 - this client gets a generation error, the others go on
            log.exception("prefill failed")
            job.status = RequestStatus.FAILED
            job.emit(err)

    def _decode(self) -> None:
        try:
            self.engine.decode(self.batch)
        except Exception as err:  # noqa: BLE001 - the batch's clients get a generation error, the server lives
            log.exception("decode step of %d rows failed", len(self.batch))
            for row in self.batch.rows:
                row.job.status = RequestStatus.FAILED
                row.job.emit(err)
            self.batch.clear()
            return
        self.batch.keep([i for i, row in enumerate(self.batch.rows) if not row.done])
