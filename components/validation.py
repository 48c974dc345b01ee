"""Validation during training: label accuracy over wall-clock, the best adapter kept, early stopping.

What a user waits for is a model good enough to promote, so the train stage measures that directly on
a held-out slice (data.val_examples) every train.eval_every steps, keeps the best adapter seen, and
stops once train.target_accuracy is reached or train.max_minutes have passed.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from components import labels as label_scoring
from components.checkpoints import BEST, VALIDATION, Durable, agreed
from components.config import TrainSection
from components.util import console, read_json, write_json


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


def make_callback(cfg: TrainSection, base_dir: Path, examples: list[dict], labels: list[str], durable: Durable,
                  tracker, started: float):
    """A TrainerCallback; its state (curve, best) lives in the checkpoint root, so a resumed run keeps it."""
    from transformers import TrainerCallback

    from components.inference import load_tokenizer

    gen_tok = load_tokenizer(base_dir)  # left padding: batched generation
    trie = label_scoring.LabelTrie(gen_tok, labels)
    prompts, answers = [e["prompt"] for e in examples], [e["answer"] for e in examples]
    root = durable.local
    state_file = root / VALIDATION

    class Validate(TrainerCallback):
        def __init__(self):
            saved = read_json(state_file) if state_file.exists() else {}
            self.curve: list[dict] = saved.get("curve", [])
            self.best: dict | None = saved.get("best")
            self.offset = self.curve[-1]["seconds"] if self.curve else 0.0  # wall-clock of earlier attempts
            self.seconds_spent = 0.0  # validating, in this process: kept out of training's tokens/s

        def measure(self, model, state) -> float:
            begun = time.perf_counter()
            was_training = model.training
            model.eval()
            preds = label_scoring.predict(model, gen_tok, prompts, labels, cfg.batch_size * 2, trie)
            model.train(was_training)
            acc = label_scoring.accuracy(preds, answers)
            point = {"step": state.global_step, "seconds": round(self.offset + time.perf_counter() - started, 2),
                     "accuracy": acc, "tokens_seen": int(state.num_input_tokens_seen)}
            self.curve.append(point)
            tracker.log_metrics({"val.label_accuracy": acc, "val.minutes": point["seconds"] / 60}, step=state.global_step)
            console.print(f"step {state.global_step}: validation accuracy {acc:.3f} at {point['seconds'] / 60:.1f} min")
            self.seconds_spent += time.perf_counter() - begun
            return acc

        def on_train_begin(self, args, state, control, model=None, **kw):
            # resumed from a checkpoint older than the last validation: those steps are trained again
            self.curve = [p for p in self.curve if p["step"] <= state.global_step]
            if state.global_step == 0 and not self.curve:  # the base model's accuracy starts the curve
                self.measure(model, state)
                self._save(state)

        def on_step_end(self, args, state, control, model=None, **kw):
            minutes = (self.offset + time.perf_counter() - started) / 60
            out_of_time = agreed(cfg.max_minutes is not None and minutes >= cfg.max_minutes, args.device)
            if state.global_step % cfg.eval_every and not out_of_time and state.global_step < state.max_steps:
                return
            acc = self.measure(model, state)
            improved = self.best is None or acc > self.best["accuracy"]
            if improved:
                self.best = {"step": state.global_step, "accuracy": acc, "seconds": self.curve[-1]["seconds"],
                             "dir": f"{BEST}-{state.global_step}"}
                if state.is_world_process_zero:  # whole, here and on S3, before the record names it
                    model.save_pretrained(root / self.best["dir"])
                    durable.push(self.best["dir"])
            self._save(state)
            if improved and state.is_world_process_zero:
                for old in root.glob(f"{BEST}-*"):
                    if old.name != self.best["dir"]:
                        shutil.rmtree(old, ignore_errors=True)
            if cfg.target_accuracy is not None and acc >= cfg.target_accuracy:
                console.print(f"target accuracy {cfg.target_accuracy:.2f} reached at step {state.global_step}: stopping")
                control.should_training_stop = True
            elif out_of_time:
                console.print(f"train.max_minutes={cfg.max_minutes} reached at step {state.global_step}: stopping")
                control.should_training_stop = True

        def _save(self, state):
            if state.is_world_process_zero:
                write_json(state_file, {"curve": self.curve, "best": self.best})
                durable.push(VALIDATION)

        def summary(self, out_dir: Path) -> dict:
            write_json(out_dir / "validation_curve.json", self.curve)
            plot = plot_curve(self.curve, out_dir / "accuracy_over_time.png", cfg.target_accuracy)
            tracker.log_artifact(plot)
            tracker.log_artifact(out_dir / "validation_curve.json")
            reached = next((p for p in self.curve if cfg.target_accuracy and p["accuracy"] >= cfg.target_accuracy), None)
            return {"val_best_accuracy": self.best["accuracy"] if self.best else None,
                    "val_best_step": self.best["step"] if self.best else None,
                    "val_first_accuracy": self.curve[0]["accuracy"] if self.curve else None,
                    "val_seconds_to_target": reached["seconds"] if reached else None,
                    "val_seconds_spent": self.seconds_spent}

    return Validate()
