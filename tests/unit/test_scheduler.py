"""The scheduler's turn and the decode batch, on a fake engine and small tensors: no model, no server, no thread.

`Scheduler.step` is one turn (admit, prefill, drop ended rows, decode, let finished rows leave), so each test
drives turns by hand and reads the jobs' RequestStatus and what each job emitted.
"""

import pytest
import torch
from transformers import DynamicCache

from serving.decode_batch import DecodeBatch
from serving.decoding import FINAL, Job, RequestStatus, Sampling
from serving.scheduler import Scheduler

pytestmark = pytest.mark.unit

HEADS, DIM = 1, 2


def cache_of(length: int, fill: float) -> DynamicCache:
    """A one-layer cache of `length` columns, every value `fill` (so a row's columns can be told apart)."""
    cache = DynamicCache()
    states = torch.full((1, HEADS, length, DIM), fill)
    cache.update(states, states.clone(), 0)
    return cache


class FakeRow:
    def __init__(self, job: Job):
        self.job = job

    @property
    def done(self) -> bool:
        return self.job.status in FINAL

    def emit_token(self) -> None:
        """One token; the row's last (its job's max_new_tokens reached) finishes it, as Row does."""
        self.job.emitted.append("token")
        if len(self.job.emitted) >= self.job.sampling.max_new_tokens:
            self.job.status = RequestStatus.FINISHED


class FakeEngine:
    """Prefill emits the first token; decode one token per row. Prompts [13] fail in prefill; `fail_decode`
    makes the next decode step raise."""

    def __init__(self):
        self.prefilled, self.decoded, self.fail_decode = [], [], False

    def prefill(self, job: Job):
        if job.ids == [13]:
            raise RuntimeError("prefill broke")
        self.prefilled.append(job)
        row = FakeRow(job)
        row.emit_token()
        return row, cache_of(len(job.ids), float(job.ids[0]))

    def decode(self, batch: DecodeBatch) -> None:
        if self.fail_decode:
            raise RuntimeError("decode broke")
        self.decoded.append(len(batch))
        for row in batch.rows:
            row.emit_token()


def job(ids: list[int], new_tokens: int) -> Job:
    made = Job(ids, Sampling(max_new_tokens=new_tokens), None, lambda item: made.errors.append(item))
    made.emitted, made.errors = [], []
    return made


@pytest.fixture
def scheduler():
    return Scheduler(FakeEngine(), max_batch_size=2)


def test_admission_takes_the_oldest_jobs_while_the_batch_has_room(scheduler):
    first, second, third = job([1], 3), job([2, 2], 3), job([3], 3)
    scheduler.submit(first, second, third)
    assert [j.status for j in (first, second, third)] == [RequestStatus.WAITING] * 3
    scheduler.step()
    assert scheduler.engine.prefilled == [first, second] and scheduler.queued() == 1
    assert (first.status, third.status) == (RequestStatus.RUNNING, RequestStatus.WAITING)
    assert scheduler.engine.decoded == [2] and scheduler.running() == 2


def test_finished_rows_leave_and_a_waiting_job_takes_their_place(scheduler):
    short, long, late = job([1], 2), job([2], 4), job([3], 2)
    scheduler.submit(short, long, late)
    scheduler.step()  # prefill: one token each; decode: the second, which finishes `short`
    assert short.status is RequestStatus.FINISHED and len(short.emitted) == 2
    assert scheduler.running() == 1 and late.status is RequestStatus.WAITING
    scheduler.step()  # `late` joins the running `long`
    assert late.status is RequestStatus.FINISHED and scheduler.engine.decoded == [2, 2]
    scheduler.step()
    assert long.status is RequestStatus.FINISHED and len(long.emitted) == 4
    assert scheduler.running() == 0 and scheduler.queued() == 0


def test_cancel_drops_a_waiting_job_now_and_a_running_row_at_the_next_step(scheduler):
    running, other, waiting = job([1], 5), job([2], 5), job([3], 5)
    scheduler.submit(running, other, waiting)
    scheduler.step()
    scheduler.cancel([running, waiting])
    assert scheduler.queued() == 0 and waiting.status is RequestStatus.CANCELLED
    emitted = len(running.emitted)
    scheduler.step()
    assert running.status is RequestStatus.CANCELLED and len(running.emitted) == emitted  # no token after
    assert scheduler.engine.decoded[-1] == 1 and scheduler.running() == 1
    assert waiting not in scheduler.engine.prefilled


def test_a_job_cancelled_after_admission_is_never_prefilled(scheduler):
    admitted = job([1], 3)
    scheduler.submit(admitted)
    assert scheduler.schedule() == [admitted]  # decided this turn, not yet executed
    scheduler.cancel([admitted])
    scheduler._start(admitted)
    assert scheduler.engine.prefilled == [] and admitted.status is RequestStatus.CANCELLED


def test_cancelling_a_finished_job_keeps_its_status(scheduler):
    done = job([1], 1)
    scheduler.submit(done)
    scheduler.step()
    scheduler.cancel([done])
    assert done.status is RequestStatus.FINISHED


def test_a_prefill_error_fails_that_job_only(scheduler):
    broken, fine = job([13], 3), job([2], 2)
    scheduler.submit(broken, fine)
    scheduler.step()
    assert broken.status is RequestStatus.FAILED and str(broken.errors[0]) == "prefill broke"
    assert fine.status is RequestStatus.FINISHED and not fine.errors


def test_a_decode_error_fails_every_row_in_the_batch_and_empties_it(scheduler):
    first, second = job([1], 5), job([2], 5)
    scheduler.submit(first, second)
    scheduler.engine.fail_decode = True
    scheduler.step()
    assert [j.status for j in (first, second)] == [RequestStatus.FAILED] * 2
    assert [str(j.errors[0]) for j in (first, second)] == ["decode broke"] * 2
    assert scheduler.running() == 0 and scheduler.batch.cache is None
    scheduler.engine.fail_decode = False
    after = job([3], 2)
    scheduler.submit(after)
    scheduler.step()  # the scheduler goes on
    assert after.status is RequestStatus.FINISHED


def test_join_left_pads_the_narrower_side_and_keep_drops_unused_columns():
    batch = DecodeBatch()
    batch.join("short", cache_of(2, 1.0))
    batch.join("long", cache_of(5, 2.0))  # the batch grows by 3 columns on the left of the first row
    keys = batch.cache.layers[0].keys
    assert keys.shape == (2, HEADS, 5, DIM) and batch.starts == [3, 0]
    assert keys[0, 0, :3].abs().sum() == 0 and (keys[0, 0, 3:] == 1.0).all() and (keys[1, 0] == 2.0).all()
    batch.join("middle", cache_of(3, 3.0))  # narrower than the batch: padded itself
    assert batch.starts == [3, 0, 2] and (batch.cache.layers[0].values[2, 0, 2:] == 3.0).all()

    batch.keep([0, 2])  # "long" leaves; the first two columns are nobody's now
    assert batch.rows == ["short", "middle"] and batch.starts == [1, 0] and batch.width == 3
    assert (batch.cache.layers[0].keys[0, 0, 1:] == 1.0).all() and (batch.cache.layers[0].keys[1, 0] == 3.0).all()
    batch.keep([])
    assert len(batch) == 0 and batch.cache is None and batch.width == 0
