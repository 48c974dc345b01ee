"""Benchmark: what a SIGKILL at a random step costs training on the tiny Llama (QLoRA on CPU).

One uninterrupted run gives the per-step time and the adapter to compare with. A second run with the
same inputs is killed (SIGKILL to its process group, no chance to save) at a few seeded random steps
and restarted each time; the last restart runs to the end. Per kill: steps lost (the step reached
minus the checkpoint resumed from, at most checkpoint_every) and the restart time (from starting the
process until training completes the first step past the checkpoint).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

STEPS, EVERY, KILLS, SEED = 40, 4, 3, 7
MARK = "@@bench-step"

# The child wraps train.ReportProgress so each finished step prints a marker with a wall-clock time:
# train.py's own progress bar does not reach a pipe, and the parent must see steps as they happen.
CHILD = f"""
import json, sys, time
from components.stages import train
from components.config import TrainSection

class Marked(train.ReportProgress):
    def on_step_end(self, args, state, control, **kw):
        print("{MARK}", state.global_step, repr(time.time()), flush=True)
        return super().on_step_end(args, state, control, **kw)

train.ReportProgress = Marked
train.run(TrainSection(**json.loads(sys.argv[1])), sys.argv[2], sys.argv[3], sys.argv[4])
"""


def _set(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextmanager
def _env(**values: str | None):
    """Set (or, with None, remove) environment variables for the duration, then put them back."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        _set(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            _set(k, v)


def fixtures(scratch: Path) -> tuple[Path, Path]:
    """The tiny base and prepared demo data, built as the tiny_base / demo_prepared fixtures build them."""
    from components.config import DataSection, ModelSection
    from components.stages import base_model, prepare_data
    from tests.conftest import build_tiny_llama

    # No MLflow runs from a benchmark, and the base-model cache stays inside the scratch directory.
    with _env(MLFLOW_TRACKING_URI=None, LLMOPS_CACHE=str(scratch / "cache")):
        source = build_tiny_llama(scratch / "tiny-src")
        base = scratch / "tiny-base" / "model"
        base_model.run(ModelSection(base_model=str(source)), base)
        data = scratch / "demo-data"
        prepare_data.run(DataSection(), base, data)
    return base, data


class Segment:
    """One training process: its start time and the wall-clock end time of each step it finished."""

    def __init__(self, base: Path, data: Path, root: Path, out: Path):
        cfg = {"max_steps": STEPS, "checkpoint_every": EVERY, "log_every": EVERY, "checkpoint_root": str(root)}
        # One intra-op thread: the resumed adapter can then be compared bit for bit (see test_preemption),
        # and the benchmark leaves the second core to whatever else runs on the machine.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMOPS_CACHE": str(root.parent / "cache")}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.steps: dict[int, float] = {}
        self.tail: list[str] = []
        self.started = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(cfg), str(base), str(data), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )  # its own group: SIGKILL reaches every child too

    def run(self, kill_at: int | None = None) -> int:
        """Read markers until the process ends, or SIGKILL it once it has finished step kill_at."""
        for line in self.proc.stdout:
            if line.startswith(MARK):
                step, stamp = line.split()[1:3]
                self.steps[int(step)] = float(stamp)
                if kill_at is not None and int(step) >= kill_at:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    kill_at = None  # keep draining: markers already in the pipe count as steps reached
            else:
                self.tail = (self.tail + [line])[-40:]
        code = self.proc.wait()
        if code not in (0, -signal.SIGKILL):
            raise RuntimeError(f"training exited with {code}:\n{''.join(self.tail)}")
        return code

    @property
    def last(self) -> int:
        return max(self.steps, default=0)


def measure() -> dict:
    from safetensors.torch import load_file

    from components.checkpoints import last_complete_checkpoint

    scratch = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    try:
        base, data = fixtures(scratch)
        whole = Segment(base, data, scratch / "ckpt-whole", scratch / "out-whole")
        whole.run()
        per_step = (whole.steps[STEPS] - whole.steps[1]) / (STEPS - 1)  # checkpoint saves included, amortized
        fresh_start = whole.steps[1] - whole.started

        rng = random.Random(SEED)
        # Sorted distinct steps past the first checkpoint: each restart then has something to resume
        # from and still reaches the next kill point; none is the last step, so every kill interrupts.
        targets = sorted(rng.sample(range(EVERY + 1, STEPS), KILLS))
        root, out = scratch / "ckpt-killed", scratch / "out-killed"
        segment, kills, wall = Segment(base, data, root, out), [], 0.0
        for target in targets + [None]:
            code = segment.run(kill_at=target)
            wall += max(segment.steps.values(), default=segment.started) - segment.started
            if target is None:
                break
            if code != -signal.SIGKILL or segment.last >= STEPS:
                raise RuntimeError(f"the run ended before the kill at step {target}")
            (run_dir,) = root.iterdir()  # one directory per run key; both segments share it
            checkpoint = last_complete_checkpoint(run_dir)
            resumed_from = int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else 0
            killed_at = segment.last
            segment = Segment(base, data, root, out)
            kills.append({"target": target, "killed_at": killed_at, "resumed_from": resumed_from, "segment": segment})
        for kill in kills:
            seg = kill.pop("segment")
            first = min(seg.steps)
            if first != kill["resumed_from"] + 1:  # the trainer must pick the checkpoint we saw on disk
                raise RuntimeError(f"expected to resume after step {kill['resumed_from']}, first step was {first}")
            kill["lost"] = kill["killed_at"] - kill["resumed_from"]
            kill["restart_s"] = seg.steps[first] - seg.started
        metrics = json.loads((out / "train_metrics.json").read_text())
        if metrics["steps"] != STEPS or metrics["resumed_from_step"] != kills[-1]["resumed_from"]:
            raise RuntimeError(f"the last restart did not finish from its checkpoint: {metrics}")
        if max(k["lost"] for k in kills) > EVERY:  # more would mean a checkpoint was skipped or not restored
            raise RuntimeError(f"a kill lost more than checkpoint_every={EVERY} steps: {kills}")
        a, b = (load_file(p / "adapter_model.safetensors") for p in (scratch / "out-whole", out))
        identical = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
        lost = [k["lost"] for k in kills]
        restarts = [k["restart_s"] for k in kills]
        return {
            "steps": STEPS,
            "every": EVERY,
            "seed": SEED,
            "per_step_s": per_step,
            "fresh_start_s": fresh_start,
            "whole_s": whole.steps[STEPS] - whole.started,
            "killed_total_s": wall,
            "kills": kills,
            "lost_max": max(lost),
            "lost_mean": statistics.mean(lost),
            "restart_mean_s": statistics.mean(restarts),
            "restart_max_s": max(restarts),
            "final_steps": metrics["steps"],
            "identical": identical,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    step, every = result["per_step_s"], result["every"]
    kills = ", ".join(f"{k['killed_at']}→{k['resumed_from']}" for k in result["kills"])
    return [
        (f"uninterrupted: {result['steps']} steps, checkpoint every {every} (s per step)", f"{step:.2f}", "", "1.00x"),
        (
            "uninterrupted: process start → step 1 done (s)",
            f"{result['fresh_start_s']:.1f}",
            "",
            f"{result['fresh_start_s'] / step:.1f}x",
        ),
        (f"SIGKILL at steps → resumed from (seed {result['seed']})", kills, "", ""),
        ("steps lost per kill, max / mean", f"{result['lost_max']} / {result['lost_mean']:.1f}", f"≤ {every}", ""),
        (
            "restart → first step past the checkpoint done (s), mean / max",
            f"{result['restart_mean_s']:.1f} / {result['restart_max_s']:.1f}",
            "",
            f"{result['restart_mean_s'] / step:.1f}x",
        ),
        (
            f"wall time with {len(result['kills'])} kills vs uninterrupted (s)",
            f"{result['killed_total_s']:.0f} vs {result['whole_s']:.0f}",
            "",
            f"{result['killed_total_s'] / result['whole_s']:.2f}x",
        ),
        (
            "resumed adapter equals the uninterrupted one, bit for bit",
            "yes" if result["identical"] else "NO",
            "yes",
            "",
        ),
    ]
