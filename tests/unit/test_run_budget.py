"""train.max_minutes as the run's budget: the clock `llmops run` hands its tasks, the forecast of the stages after
training, the cosine schedule that ends at the training deadline, and the train stage stopping on it."""

import math
import time
from pathlib import Path

import pytest
import torch

from components import run_budget
from components.environment import RUN_STARTED
from components.run_budget import RunClock, follow_clock
from tests.conftest import learner

pytestmark = pytest.mark.unit

PASSES = sum(run_budget.PASSES_AFTER_TRAINING.values())


def test_without_the_runs_start_the_clock_is_the_stages_and_forecasts_nothing(monkeypatch):
    monkeypatch.delenv(RUN_STARTED.name, raising=False)
    clock = RunClock.start(10, eval_rows=500, stage_started=1000.0, earlier_seconds=120.0)
    assert not clock.from_run and clock.started == 880.0  # earlier attempts' wall-clock counts, as before
    clock.observe(200, 20.0)
    assert clock.forecast() == 0.0  # the stages after training are not on the stage's clock
    assert clock.deadline() == 880.0 + 600
    assert clock.left(now=1000.0) == 480.0


def test_the_runs_clock_keeps_the_forecast_of_the_later_stages_from_training(monkeypatch):
    monkeypatch.setenv(RUN_STARTED.name, "5000.5")
    clock = RunClock.start(45, eval_rows=500, stage_started=5100.0)
    assert clock.from_run and clock.started == 5000.5
    assert clock.forecast() == 0.0  # no validation row timed yet
    clock.observe(200, 20.0)  # 0.1 s a validation row
    forecast = 500 * 0.1 * PASSES + run_budget.FIXED_SECONDS_AFTER
    assert clock.forecast() == pytest.approx(forecast)
    assert clock.deadline() == pytest.approx(5000.5 + 45 * 60 - forecast)
    clock.observe(200, 40.0)  # a slower machine: the forecast follows the last measurement
    assert clock.forecast() == pytest.approx(500 * 0.2 * PASSES + run_budget.FIXED_SECONDS_AFTER)
    assert clock.progress(now=5000.5) == 0.0 and clock.progress(now=clock.deadline() + 1) == 1.0
    halfway = 5000.5 + (clock.deadline() - 5000.5) / 2
    assert clock.progress(now=halfway) == pytest.approx(0.5)


def test_training_stops_a_validation_pass_before_the_later_stages_time(monkeypatch):
    """A stop sets off one more validation pass (the best adapter is chosen after it): the deadline keeps its time."""
    monkeypatch.setenv(RUN_STARTED.name, "0")
    clock = RunClock.start(45, eval_rows=500, stage_started=60.0, stop_rows=200)
    silent = RunClock.start(45, eval_rows=500, stage_started=60.0)
    for c in (clock, silent):
        c.observe(200, 20.0)
    assert clock.forecast() == silent.forecast()  # what the stages after training get is unchanged
    assert silent.deadline() - clock.deadline() == pytest.approx(200 * 0.1)


def test_the_schedule_is_transformers_cosine_until_the_clock_is_further_along():
    from transformers import get_cosine_schedule_with_warmup

    clock = RunClock(budget=3600, started=time.time(), eval_rows=0, from_run=False)
    reference = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 5, 100)
    multiplier = follow_clock(reference.lr_lambdas[0], clock, warmup_steps=5, max_steps=100)
    expected = [reference.lr_lambdas[0](step) for step in range(101)]
    assert [multiplier(step) for step in range(101)] == pytest.approx(expected, abs=1e-12)  # the clock at 0

    clock.settled = 0.5  # half the time to the deadline gone, but only step 10 of 100
    assert multiplier(10) == pytest.approx(0.5)  # cos at half the schedule, not at a twentieth
    assert multiplier(80) == pytest.approx(expected[80])  # the steps further along: they decide
    clock.settled = 1.0  # the deadline: decayed whatever the step, warmup still by step
    assert multiplier(10) == pytest.approx(0.0, abs=1e-12) and multiplier(2) == pytest.approx(2 / 5)


def test_the_ranks_act_on_the_largest_progress_any_of_them_measured(tmp_path):
    """Two gloo ranks with different clocks settle on one value (a unit-sized process group on CPU)."""
    import torch.multiprocessing as mp

    mp.start_processes(settle_on_two_ranks, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")
    assert sorted(p.read_text() for p in tmp_path.glob("rank-*")) == ["0.75", "0.75"]


def settle_on_two_ranks(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist

    from components.checkpoints import largest_of_ranks

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        settled = largest_of_ranks([0.25, 0.75][rank], "cpu")
        (Path(out) / f"rank-{rank}").write_text(f"{settled:.2f}")
    finally:
        dist.destroy_process_group()


def test_the_budgeted_trainer_schedules_the_named_scheduler_on_its_clock(tmp_path):
    """The Trainer's own scheduler (train.lr_scheduler), each step's multiplier taken where the clock stands."""
    from transformers import TrainingArguments

    clock = RunClock(budget=3600, started=time.time(), eval_rows=0, from_run=False, settled=0.5)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=10, lr_scheduler_type="linear", learning_rate=0.5, report_to="none"
    )
    trainer = run_budget.BudgetedTrainer(model=torch.nn.Linear(2, 2), args=args, clock=clock)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5)  # linear at half the time, not at step 3
    clock.settled = 0.0
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 6 / 10)  # the step, once the clock is behind it


def train_stage(base, data, out, **kw):
    from components.reports import Train
    from components.stages import train

    cfg = learner(out / "ck", max_steps=3, eval_every=3, checkpoint_every=3, **kw)
    train.run(cfg, base, data, out / "adapter")
    return Train.read(out / "adapter" / "train_metrics.json")


def test_on_the_runs_clock_training_stops_where_the_later_stages_need_the_rest(
    mapping_base, with_validation, tmp_path, monkeypatch
):
    """One minute for the whole run, where the stages after training alone are forecast at more: training stops at
    its first step. The same minute on the stage's own clock trains all three steps."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(RUN_STARTED.name, f"{time.time():.3f}")
    on_run = train_stage(mapping_base, with_validation, tmp_path / "run", max_minutes=1)
    assert on_run.budget_from_run_start and on_run.steps == 1
    assert on_run.budget_forecast_after_seconds > run_budget.FIXED_SECONDS_AFTER >= 60
    assert 0 < on_run.budget_clock_seconds < 60

    monkeypatch.delenv(RUN_STARTED.name)
    on_stage = train_stage(mapping_base, with_validation, tmp_path / "stage", max_minutes=1)
    assert on_stage.budget_from_run_start is False and on_stage.steps == 3
    assert on_stage.budget_forecast_after_seconds == 0.0
    assert math.isfinite(on_stage.budget_clock_seconds)
