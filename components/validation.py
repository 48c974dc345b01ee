"""Validation during training: label accuracy over wall-clock, the best adapter kept, early stopping.

What a user waits for is a model good enough to promote, so the train stage measures that directly on
a held-out slice (data.val_examples) every train.eval_every steps, keeps the best adapter seen, and
stops once train.target_accuracy is reached or the time train.max_minutes budgets for training has passed
(components/run_budget.py: under `llmops run`, the whole run's budget less the stages after training).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from components.artifacts import TrainedAdapter
from components.checkpoints import BEST, VALIDATION, CheckpointStore, largest_of_ranks, read_validation
from components.config import TrainSection
from components.fsdp import save_adapter
from components.inference import LabelTrie, load_tokenizer, predict_labels
from components.literal_text import model_input
from components.run_budget import RunClock
from components.scoring import accuracy
from components.util import console, write_json


def plot_curve(curve: list[dict], path: Path, target: float | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p["seconds"] / 60 for p in curve], [p["accuracy"] for p in curve], marker="o")
    if target:
        ax.axhline(target, linestyle="--", color="grey", label=f"target {target:.0%}")
        ax.legend(loc="lower right")
    ax.set_xlabel("wall-clock minutes since the train stage started")
    ax.set_ylabel("validation label accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class ValidateAndStop(TrainerCallback):
    """Label accuracy on the validation slice every cfg.eval_every steps; the best adapter kept; the stop.

    Its state (the curve, the best adapter) lives in the checkpoint store, so a resumed run keeps it.
    """

    def __init__(
        self,
        cfg: TrainSection,
        base_dir: Path,
        examples: list[dict],
        labels: list[str],
        store: CheckpointStore,
        tracker,
        started: float,
        eval_rows: int = 0,
    ):
        self.cfg, self.store, self.tracker, self.started = cfg, store, tracker, started
        self.tok = load_tokenizer(base_dir)  # left padding: batched generation
        self.trie = LabelTrie(self.tok, labels)
        self.prompts, self.answers = [model_input(e) for e in examples], [e["answer"] for e in examples]
        self.state_file = store.local / VALIDATION
        saved = read_validation(self.state_file) if self.state_file.exists() else {}
        self.curve: list[dict] = saved.get("curve", [])
        self.best: dict | None = saved.get("best")
        self.offset = self.curve[-1]["seconds"] if self.curve else 0.0  # wall-clock of earlier attempts
        self.seconds_spent = 0.0  # validating, in this process: kept out of training's tokens/s
        stage_started = time.time() - (time.perf_counter() - started)  # the stage's start, in Unix seconds
        self.clock = None
        if cfg.max_minutes:
            self.clock = RunClock.start(cfg.max_minutes, eval_rows, stage_started, self.offset, len(self.prompts))

    def on_train_begin(self, args, state, control, model=None, **kw):
        # resumed from a checkpoint older than the last validation: those steps are trained again
        self.curve = [p for p in self.curve if p["step"] <= state.global_step]
        if state.global_step == 0 and not self.curve:  # the base model's accuracy starts the curve
            self._measure(model, state)
            self._save_state(state)

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.clock:  # one collective a step: the schedule's next step and the stop read the agreed progress
            self.clock.settled = largest_of_ranks(self.clock.progress(), args.device)
        out_of_time = self.clock is not None and self.clock.settled >= 1.0  # at or past the training deadline
        due = state.global_step % self.cfg.eval_every == 0 or state.global_step >= state.max_steps
        if not (due or out_of_time):
            return
        acc = self._measure(model, state)
        if self.best is None or acc > self.best["accuracy"]:
            self._keep_best(model, state, acc)
        else:
            self._save_state(state)
        if self._should_stop(acc, out_of_time, state.global_step):  # never un-stops another callback's stop
            control.should_training_stop = True

    def _measure(self, model, state) -> float:
        begun = time.perf_counter()
        was_training = model.training
        model.eval()
        predictions = predict_labels(model, self.tok, self.prompts, self.trie, self.cfg.batch_size * 2)
        model.train(was_training)
        if self.clock:  # the row time the forecast of the stages after training scales with
            self.clock.observe(len(self.prompts), time.perf_counter() - begun)
        acc = accuracy(predictions, self.answers)
        point = {
            "step": state.global_step,
            "seconds": round(self.offset + time.perf_counter() - self.started, 2),
            "accuracy": acc,
            "tokens_seen": int(state.num_input_tokens_seen),
        }
        self.curve.append(point)
        self.tracker.log_metrics(
            {"val.label_accuracy": acc, "val.minutes": point["seconds"] / 60}, step=state.global_step
        )
        console.print(
            f"step {state.global_step}: validation accuracy {acc:.3f} at {point['seconds'] / 60:.1f} min"
            + (f" ({self.clock.describe()})" if self.clock else "")
        )
        self.seconds_spent += time.perf_counter() - begun
        return acc

    def _keep_best(self, model, state, acc: float) -> None:
        """The new best adapter is written whole (here and on S3) before the record names it; then the old goes."""
        self.best = {
            "step": state.global_step,
            "accuracy": acc,
            "seconds": self.curve[-1]["seconds"],
            "dir": f"{BEST}-{state.global_step}",
        }
        save_adapter(model, self.store.local / self.best["dir"], state.is_world_process_zero)
        if state.is_world_process_zero:
            self.store.push(self.best["dir"])
        self._save_state(state)
        if state.is_world_process_zero:
            for old in self.store.local.glob(f"{BEST}-*"):
                if old.name != self.best["dir"]:
                    shutil.rmtree(old, ignore_errors=True)

    def _save_state(self, state) -> None:
        if state.is_world_process_zero:
            write_json(self.state_file, {"curve": self.curve, "best": self.best})
            self.store.push(VALIDATION)

    def _should_stop(self, acc: float, out_of_time: bool, step: int) -> bool:
        if self.cfg.target_accuracy is not None and acc >= self.cfg.target_accuracy:
            console.print(f"target accuracy {self.cfg.target_accuracy:.2f} reached at step {step}: stopping")
            return True
        if out_of_time:
            console.print(f"train.max_minutes={self.cfg.max_minutes}: {self.clock.describe()}; stopping at step {step}")
            return True
        return False

    def summary(self, out_dir: Path) -> dict:
        out = TrainedAdapter(out_dir)
        write_json(out.validation_curve_file, self.curve)
        self.tracker.log_artifact(plot_curve(self.curve, out.accuracy_plot_file, self.cfg.target_accuracy))
        self.tracker.log_artifact(out.validation_curve_file)
        target = self.cfg.target_accuracy
        reached = next((p for p in self.curve if target and p["accuracy"] >= target), None)
        return {
            "val_best_accuracy": self.best["accuracy"] if self.best else None,
            "val_best_step": self.best["step"] if self.best else None,
            "val_first_accuracy": self.curve[0]["accuracy"] if self.curve else None,
            "val_seconds_to_target": reached["seconds"] if reached else None,
            "val_seconds_spent": self.seconds_spent,
            # the budget's clock when training ended, and what it kept for the stages after training
            "budget_clock_seconds": time.time() - self.clock.started if self.clock else None,
            "budget_forecast_after_seconds": self.clock.forecast() if self.clock else None,
            "budget_from_run_start": self.clock.from_run if self.clock else None,
        }
