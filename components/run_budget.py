"""The run's time budget (train.max_minutes): training gets what is left once the stages after it are forecast.

Run as: part of the train stage (`llmops run --profile banking77` sets a 45-minute budget).

The clock. `llmops run` writes the run's start (Unix seconds) to LLMOPS_RUN_STARTED in its own environment, and
kfp.local hands that environment to every task. An inherited variable is in neither kfp.local's cache key nor the
KFP backend's (which hashes every resolved input), so a train task that would come from the cache still does. Where
it is unset (a stage run alone, a cluster run) the clock starts with the train stage, less the wall-clock of earlier
attempts, as train.max_minutes always counted.

The forecast. After training, evaluate scores the eval split twice (the adapter, the base) and quantize scores it
twice more (the merge, and its int8; NF4 of a LoRA merge this small is reported without scoring). Each pass costs a
measured multiple of a validation row, which training itself times at every validation pass, so the forecast follows
the machine's speed of the day. The merge, registration and the tasks' start-ups are a fixed part.

The schedule. With a budget, the schedule train.lr_scheduler names runs on whichever is further along: the steps
(train.max_steps) or the clock (the run's start to the training deadline), so a cosine has decayed when time runs
out on a slow day, and the step schedule is unchanged on a fast one.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from components.answer_batches import answer_tokens, split_batch
from components.environment import RUN_STARTED
from components.fsdp import ShardedTrainer

# Seconds of one eval row in a scoring pass, over one validation row at the end of training: a validation row
# constrains the label only; a scoring row also generates the free answer and takes the response loss, and each
# stage loads its model. Measured on BANKING77's run of 2026-12-06 09:19 (500 eval rows; its last validation pass
# 0.153 s a row), whose evaluate and quantize were rerun alone (`llmops stage`) once the response loss kept logits
# for the answer window only: evaluate 138 s (1.80x), quantize 151 s (1.97x). Each is split between its passes as
# an earlier rerun timed them: the adapter 0.75 to the base 1.2 (no free answer of the base is a label, so all 500
# are decoded again under the constraint); the merge 0.95 to its int8 1.8 (bitsandbytes' 8-bit matmul on CPU).
# `llmops run` prints the forecast beside what the stages took.
PASSES_AFTER_TRAINING = {
    "evaluate: adapter": 0.69,
    "evaluate: base": 1.11,
    "quantize: merge": 0.68,
    "quantize: int8": 1.29,
}
# the same run: merge 23 s, then the train stage's end, register, gate, alias and the exit task 33 s
FIXED_SECONDS_AFTER = 60.0


@dataclass
class RunClock:
    """Where the run stands against its budget; `observe` feeds it each validation pass's measured row time."""

    budget: float  # seconds, the whole run's
    started: float  # Unix seconds: the run's start, or the train stage's less its earlier attempts
    eval_rows: int  # rows of the eval split the later stages score in each pass
    from_run: bool  # the start is the run's (LLMOPS_RUN_STARTED), not the stage's
    # Validation rows of the pass a stop sets off (the best adapter is chosen after it): training's deadline keeps
    # time for it. Without it, BANKING77 on 2026-12-06 stopped 0.7 min late: the stop was seen at the step past
    # the deadline, then its 200-row pass took 0.35 min.
    stop_rows: int = 0
    row_seconds: float | None = None  # one validation row, as last measured
    # progress() as every rank agreed at the last step's end (the largest): the schedule reads this, so data-parallel
    # replicas, whose clocks differ by their own validation timings, step with one learning rate
    settled: float = 0.0

    @classmethod
    def start(
        cls, max_minutes: float, eval_rows: int, stage_started: float, earlier_seconds: float = 0.0, stop_rows: int = 0
    ) -> RunClock:
        """The run's clock where `llmops run` set its start; else the stage's (Unix seconds), less earlier attempts."""
        run_started = RUN_STARTED.get()
        started = float(run_started) if run_started else stage_started - earlier_seconds
        return cls(max_minutes * 60, started, eval_rows, from_run=bool(run_started), stop_rows=stop_rows)

    def observe(self, rows: int, seconds: float) -> None:
        if rows:
            self.row_seconds = seconds / rows

    def forecast(self) -> float:
        """Seconds the stages after training will take; 0 where the clock is the stage's own (they are not in it)."""
        if not self.from_run or self.row_seconds is None:
            return 0.0
        return self.eval_rows * self.row_seconds * sum(PASSES_AFTER_TRAINING.values()) + FIXED_SECONDS_AFTER

    def deadline(self) -> float:
        """Unix seconds at which training must stop for the run to end inside its budget: the stopping validation
        pass and the stages after training come after it."""
        stopping = self.stop_rows * (self.row_seconds or 0.0)
        return self.started + self.budget - stopping - self.forecast()

    def left(self, now: float | None = None) -> float:
        return self.deadline() - (time.time() if now is None else now)

    def progress(self, now: float | None = None) -> float:
        """Share of the time from the clock's start to the training deadline that has passed, in [0, 1]."""
        span = self.deadline() - self.started
        if span <= 0:
            return 1.0
        return min(1.0, max(0.0, ((time.time() if now is None else now) - self.started) / span))

    def describe(self) -> str:
        passed = (time.time() - self.started) / 60
        whose = "run" if self.from_run else "train stage"
        return (
            f"{whose} budget {self.budget / 60:.0f} min: {passed:.1f} passed, {self.forecast() / 60:.1f} forecast for "
            f"the stages after training, {max(self.left(), 0) / 60:.1f} left to train"
        )


def follow_clock(step_lambda, clock: RunClock, warmup_steps: int, max_steps: int):
    """A step schedule's learning-rate multiplier, past warmup fed the further along of the step and the step the
    clock's agreed progress stands for (warmup plus that share of the steps after it)."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step_lambda(step)
        return step_lambda(max(step, warmup_steps + clock.settled * (max_steps - warmup_steps)))

    return multiplier


class BudgetedTrainer(ShardedTrainer):
    """The train stage's Trainer, on two budgets. Time: with a clock (train.max_minutes), the schedule
    train.lr_scheduler names follows it as well as the steps (follow_clock), so a cosine has decayed by the training
    deadline. Memory: a batch with more padded tokens than train.micro_batch_tokens runs in parts (training_step)."""

    def __init__(self, *args, clock: RunClock | None = None, micro_batch_tokens: int | None = None, **kwargs):
        self.clock = clock  # before the Trainer's own set-up, which may build the scheduler
        self.micro_batch_tokens = micro_batch_tokens
        super().__init__(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The batch's forward and backward, in parts where it is past train.micro_batch_tokens. Each part's loss
        is divided by the whole batch's answer tokens, so the parts' gradients add up to the batch's: the same
        update. Activations are held for one part at a time: BANKING77's 16 longest rows (128 tokens) peaked at
        5.0 GB whole and 3.35 GB in two parts of 8, at the same seconds (2026-12-06)."""
        parts = split_batch(inputs, self.micro_batch_tokens)
        if len(parts) == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        if num_items_in_batch is None:
            num_items_in_batch = answer_tokens(inputs["labels"])
        loss = 0.0
        for i, part in enumerate(parts):
            # as the Trainer's own accumulation does: gradients are synchronized across ranks on the last part only
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model=model):
                loss = loss + super().training_step(model, part, num_items_in_batch)
        return loss

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        from torch.optim.lr_scheduler import LambdaLR

        fresh = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        # transformers' step schedules are LambdaLRs; any other (reduce_lr_on_plateau) is left to its own signal
        if fresh and self.clock is not None and isinstance(scheduler, LambdaLR):
            warmup = self.args.get_warmup_steps(num_training_steps)
            scheduler.lr_lambdas = [
                follow_clock(f, self.clock, warmup, num_training_steps) for f in scheduler.lr_lambdas
            ]
        return scheduler
