"""Benchmark: the machine's measured matmul throughput, and how much of it our training uses (MFU).

Peak: best-of square matmuls, fp32 and bf16, at the thread count the model benchmarks use.
MFU = 6 · N · tokens/s ÷ measured bf16 peak, the usual forward+backward count for a dense model with
N total parameters, tokens/s being non-padding tokens per second of a short run of our train stage
(`components.stages.train.run` with its defaults, in a fresh process, on BANKING77). It ignores attention's
own FLOPs and the NF4 dequantization work, so it is a ratio for comparing runs, not a roofline.

`run_train` (one train stage in its own process, peak RSS sampled) is shared with the training benchmark.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from components.config import TrainSection
from components.util import read_json
from tests.benchmarks.evaluation import THREADS, banking77, base_dir, pin_threads

SIZES = (1024, 2048)
REPS = 3
STEPS = 4
MARK = "@@bench-result"

TRAIN_CHILD = f"""
import json, sys
from pathlib import Path
from components.stages import train
from components.config import TrainSection
m = train.run(TrainSection(**json.loads(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
print("{MARK}", json.dumps(m, default=str), flush=True)
"""


def tree_rss(proc: psutil.Process) -> int:
    return sum(p.memory_info().rss for p in [proc] + proc.children(recursive=True))


def sampled(cmd: list[str], env: dict, rss=tree_rss) -> tuple[str, int, float]:
    """Run cmd; return its output, the peak of rss(its process) (sampled every 0.1 s) and its wall time."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watched, peak = psutil.Process(proc.pid), [0]

    def sample():
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], rss(watched))
            except psutil.Error:
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{output[-3000:]}")
    return output, peak[0], time.perf_counter() - started


def child_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    env.pop("MLFLOW_TRACKING_URI", None)  # a benchmark's training must not add stage runs to the user's server
    return env


def run_train(section: dict, data_dir: Path) -> tuple[dict, int]:
    """Our train stage with TrainSection(**section), in its own process; (its metrics, its peak RSS)."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-train-"))
    # A fresh checkpoint root: the default is keyed by the inputs, and a rerun would resume, not train.
    section = {"checkpoint_root": str(scratch / "ckpt"), "checkpoint_every": 10_000, **section}
    try:
        output, peak, _ = sampled(
            [
                sys.executable,
                "-c",
                TRAIN_CHILD,
                json.dumps(section),
                str(base_dir()),
                str(data_dir),
                str(scratch / "out"),
            ],
            child_env(),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    line = next(text for text in output.splitlines() if text.startswith(MARK))
    return json.loads(line[len(MARK) :]), peak


def peak_gflops(dtype, n: int) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # the first call picks kernels and packs
    best = float("inf")
    for _ in range(REPS):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def measure() -> dict:
    import torch

    pin_threads()
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        for n in SIZES:
            peaks[(str(dtype).removeprefix("torch."), n)] = peak_gflops(dtype, n)
    metrics, _ = run_train({"max_steps": STEPS}, banking77())
    params = read_json(base_dir() / "llmops_base.json")["parameters"]
    return {"peaks": peaks, "train": metrics, "params": params, "load": os.getloadavg()[0]}


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    peaks = result["peaks"]
    best = {dt: max(v for (d, _), v in peaks.items() if d == dt) for dt in ("float32", "bfloat16")}
    out = [
        (
            f"matmul {n}x{n} {dt} (GFLOP/s, best of {REPS}, {THREADS} thread)",
            f"{v:.0f}",
            "",
            f"{v / best['float32']:.2f}x",
        )
        for (dt, n), v in peaks.items()
    ]
    m, n = result["train"], result["params"]
    tps = m["tokens_per_s"]
    flops = 6 * n * tps
    used = m.get("compute_dtype", "?")
    out += [
        (
            f"train stage: {m['steps']} steps, batch {TrainSection().batch_size}, BANKING77, defaults "
            f"(compute dtype {used}, gradient checkpointing {m.get('gradient_checkpointing', '?')}), "
            f"{THREADS} thread (non-padding tokens/s)",
            f"{tps:.0f}",
            "",
            "",
        ),
        (
            f"model FLOP/s = 6 × N × tokens/s, N = {n / 1e6:.1f}M total parameters (GFLOP/s)",
            f"{flops / 1e9:.1f}",
            "",
            "",
        ),
        ("MFU = 6·N·tokens/s ÷ measured bf16 peak", f"{flops / 1e9 / best['bfloat16']:.1%}", "", ""),
        ("same against the measured fp32 peak", f"{flops / 1e9 / best['float32']:.1%}", "", ""),
        (
            f"1-minute load average at the end ({os.cpu_count()} cores; above 0 means other work shared them)",
            f"{result['load']:.1f}",
            "",
            "",
        ),
    ]
    return out
