"""The engine's scheduler: gathers queued jobs into batches of one adapter and runs them in a worker thread.

One batch runs at a time, off the event loop, so the server keeps answering while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from serving.engine import Engine, Job

log = logging.getLogger(__name__)


class Batcher:
    """Gathers queued jobs into batches of one adapter and runs them, one batch at a time, in a worker thread."""

    def __init__(self, engine: Engine, *, max_batch_size: int, capacity: int, wait_s: float = 0.005, threads: int = 1):
        self.engine, self.max_batch_size, self.wait_s = engine, max_batch_size, wait_s
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=capacity)
        self.held: list[Job] = []  # taken from the queue but left for a later batch of their adapter
        self.running: list[Job] = []
        # On a shared CPU an OpenMP team stalls whenever one of its cores is busy elsewhere: measured here, a
        # decode step took 100 ms with 2 threads and 1 ms with 1. Batching, not intra-op threads, buys throughput.
        self.executor = ThreadPoolExecutor(
            1, thread_name_prefix="generate", initializer=torch.set_num_threads, initargs=(threads,)
        )

    def submit(self, job: Job) -> None:
        self.queue.put_nowait(job)  # capacity equals the in-flight limit, so this never finds the queue full

    def queued(self) -> int:
        return self.queue.qsize() + len(self.held)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.running = await self._next_batch()
            try:
                await loop.run_in_executor(self.executor, self.engine.run_batch, self.running)
            except Exception as err:  # noqa: BLE001 - the batch's clients get a generation error, the server lives
                log.exception("batch of %d failed", len(self.running))
                for job in self.running:
                    job.emit(err)
            finally:
                self.running = []

    async def _next_batch(self) -> list[Job]:
        while True:
            if not self.held:
                self.held.append(await self.queue.get())
                await asyncio.sleep(self.wait_s)  # let requests that arrive together share the batch
            while not self.queue.empty():
                self.held.append(self.queue.get_nowait())
            self.held = [job for job in self.held if not job.cancelled]
            if self.held:
                break
        adapter = self.held[0].adapter
        batch = [job for job in self.held if job.adapter == adapter][: self.max_batch_size]
        self.held = [job for job in self.held if job not in batch]
        return batch

    def close(self) -> None:
        for job in self.running:  # so the worker thread ends at its next step instead of finishing the batch
            job.cancelled = True
        self.executor.shutdown(wait=False, cancel_futures=True)
