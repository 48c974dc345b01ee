"""Benchmark: each stage's planned peak memory (components/memory_plan.py) against its measured peak (SmolLM2, CPU).

Each stage runs in its own process on the packaged SmolLM2 and the demo data: the process imports what the
stage imports, notes its RSS, runs the stage function, and reports its peak RSS (VmHWM) minus that
baseline. The benchmark plans for the host and hides any GPU from its children; with `on_gpu` the same child
reports torch.cuda.max_memory_allocated instead (the e2e test that checks evaluation's GPU plan, without the
CUDA context, which the allocator does not count). The plan is computed from the same model's config.json,
with the same settings and the prepared data's longest row. Train runs 3 QLoRA steps (bfloat16
compute) at two batch sizes, with gradient checkpointing off and on; evaluate at two eval batches; the merge
(streaming, then the parity check); quantize (the 16-bit merge, int8 and NF4, each scored). The target is the
issue's: every stage within 25% of its measured peak.

The children run with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=65536), so a freed tensor goes back
to the system and peak RSS measures what was live, as max_memory_allocated does on a GPU. With the default,
glibc raises the threshold after the first large free and keeps later ones on its heap: one row shows what
that adds to the same run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.benchmarks.evaluation import base_dir, no_tracking
from tests.benchmarks.limits import child_env

CHILD = """
import json, sys
from pathlib import Path
import psutil, torch, bitsandbytes, peft, transformers, datasets  # imported before the baseline
from components.stages import evaluate, merge, quantize, train
from components.config import EvalSection, MergeSection, QuantizeSection, TrainSection
from components.streaming_merge import stream_merge
stage, settings, paths = sys.argv[1], json.loads(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
gpu = torch.cuda.is_available()
if gpu:
    torch.cuda.reset_peak_memory_stats()
before = psutil.Process().memory_info().rss
run = {
    "train": lambda: train.run(TrainSection(**settings), *paths),
    "evaluate": lambda: evaluate.run(EvalSection(**settings), *paths),
    "merge": lambda: merge.run(MergeSection(**settings), *paths),
    "stream_merge": lambda: stream_merge(*paths, settings["dtype"], settings["nf4"]),
    "quantize": lambda: quantize.run(QuantizeSection(**settings), *paths),
}
run[stage]()
if gpu:  # the device's allocations; the host's RSS is not what runs out
    before, peak = 0, torch.cuda.max_memory_allocated()
else:  # the figure a pipeline stage records (VmHWM, not the parent's ru_maxrss carried across exec)
    from components.util import peak_rss_bytes

    peak = peak_rss_bytes()
print("PEAK", json.dumps({"before": before, "peak": peak}))
"""
TRAIN = {"max_steps": 3, "compute_dtype": "bfloat16", "eval_every": 0, "checkpoint_every": 10_000, "log_every": 1}


def growth(stage: str, settings: dict, *paths: Path, returned: bool = True, on_gpu: bool = False) -> float:
    """Peak memory growth of `stage` (train, evaluate, merge, stream_merge, quantize) run in its own process:
    RSS on the host (freed memory `returned` to the system: see above), or max_memory_allocated `on_gpu`."""
    env = child_env() | ({"MALLOC_MMAP_THRESHOLD_": "65536"} if returned else {})
    if not on_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the stages then plan for and run on the host
    done = subprocess.run(
        [sys.executable, "-c", CHILD, stage, json.dumps(settings), *map(str, paths)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{stage} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    line = next(text for text in done.stdout.splitlines() if text.startswith("PEAK "))
    measured = json.loads(line.removeprefix("PEAK "))
    return float(measured["peak"] - measured["before"])


def measure() -> dict:
    """Each stage planned as it plans itself (train from the train split, evaluate and quantize from the eval
    split), then measured."""
    from components import memory_plan
    from components.artifacts import MergedModel, PreparedData
    from components.compute import free_memory
    from components.config import DataSection, EvalSection, TrainSection
    from components.stages import prepare_data, quantize

    work = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    try:
        base, data = base_dir(), work / "data"
        with no_tracking():
            prepare_data.run(DataSection(), base, data)
        train_rows, eval_rows = PreparedData(data).examples("train"), PreparedData(data).examples("eval")
        longest, window = memory_plan.longest_row(train_rows), max(r["completion_tokens"] for r in train_rows) + 1
        tokens = memory_plan.longest_row(eval_rows)
        shape = memory_plan.model_shape(base)
        results = []
        for batch in (4, 8):
            for checkpointing in (False, True):
                settings = {**TRAIN, "batch_size": batch, "gradient_checkpointing": checkpointing}
                settings["checkpoint_root"] = str(work / f"ck-{batch}-{checkpointing}")
                measured = growth("train", settings, base, data, work / f"adapter-{batch}-{checkpointing}")
                planned = memory_plan.train_plan(shape, TrainSection(**settings), longest, window).total
                name = f"train, batch {batch}, checkpointing {'on' if checkpointing else 'off'}"
                results.append((f"{name} (longest row {longest} tokens)", measured, planned))
        settings = {**TRAIN, "batch_size": 4, "gradient_checkpointing": True, "checkpoint_root": str(work / "ck-m")}
        measured = growth("train", settings, base, data, work / "adapter-malloc", returned=False)
        planned = memory_plan.train_plan(shape, TrainSection(**settings), longest, window).total
        name = "train, batch 4, checkpointing on, glibc's default mmap threshold (no target)"
        results.append((name, measured, planned))
        adapter = work / "adapter-8-False"
        lora = memory_plan.adapter_params(adapter)
        for batch in (8, 32):
            measured = growth("evaluate", {"batch_size": batch}, base, adapter, data, work / f"eval-{batch}")
            planned = memory_plan.eval_plan(shape, EvalSection(batch_size=batch), tokens, lora, gpu=False).total
            results.append((f"evaluate, batch {batch} (longest row {tokens} tokens)", measured, planned))
        measured = growth("merge", {}, base, adapter, data, work / "merged")
        planned = memory_plan.merge_plan(shape, TrainSection(**TRAIN), free_memory(False)).total
        results.append(("merge (streaming, then the float32 parity check)", measured, planned))
        merged = MergedModel(work / "merged").model_dir
        measured = growth("quantize", {}, merged, data, work / "quantized")
        scoring = quantize.scoring_settings(merged, eval_rows)  # the batch the stage picks
        planned = memory_plan.quantize_plan(shape, scoring, tokens, gpu=False).total
        results.append((f"quantize (16-bit, int8, NF4 scored at batch {scoring.batch_size})", measured, planned))
        return {"results": results}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    out = []
    for name, measured, planned in result["results"]:
        out.append(
            (
                f"{name}: measured / planned peak (MB)",
                f"{measured / 1e6:.0f} / {planned / 1e6:.0f}",
                "" if "no target" in name else "within 25%",
                f"{planned / measured:.2f}x"
                + ("" if 0.75 <= planned / measured <= 1.25 or "no target" in name else " ✗"),
            )
        )
    return out
