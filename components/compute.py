"""Choices about compute made by measurement on the machine that trains: the dtype, and whether
activations need recomputing (gradient checkpointing) to fit in memory."""

from __future__ import annotations

import time
from pathlib import Path

from components import memory_plan
from components.artifacts import CheckpointDir, PreparedData
from components.config import TrainSection
from components.util import console


def matmul_rate(dtype, size: int = 512, reps: int = 8) -> float:
    """Matrix multiplies per second at this size; the best of three rounds, after a warm-up."""
    import torch

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - start)
    return reps / best


def measured_dtype(use_gpu: bool) -> str:
    import torch

    if use_gpu:
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    fp32, bf16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    choice = "bfloat16" if bf16 > 1.2 * fp32 else "float32"  # a small edge does not pay for bf16's rounding
    console.print(f"compute dtype {choice}: bf16 matmul {bf16 / fp32:.1f}x fp32 on this machine")
    return choice


def cgroup_headroom() -> float | None:
    """What this container may still allocate under its cgroup's memory limit (v2, else v1); None: no limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit, usage = (Path(f).read_text().strip() for f in (limit_file, usage_file))
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's huge number, mean no limit
            return float(int(limit) - int(usage))
        return None
    return None


def free_memory(use_gpu: bool) -> float:
    """Free memory where the stage will hold its tensors: the GPU's, or the host's within the cgroup limit."""
    if use_gpu:
        import torch

        return float(torch.cuda.mem_get_info()[0])
    import psutil

    free, headroom = float(psutil.virtual_memory().available), cgroup_headroom()
    return min(free, headroom) if headroom is not None else free


def run_choices(cfg: TrainSection, base_dir: Path, data_dir: Path, root: Path) -> TrainSection:
    """The "auto" choices of this run, measured once and kept beside its checkpoints.

    A restarted or data-parallel worker reads them back instead of measuring again: a noisy timing must
    not switch a resumed run to another dtype, or give two ranks different ones.
    """
    import json

    saved = CheckpointDir(root).resolved_file
    if saved.exists():
        return cfg.model_copy(update=json.loads(saved.read_text()))
    examples = PreparedData(data_dir).examples("train")
    longest = memory_plan.longest_row(examples)
    run_cfg = choose(cfg, base_dir, longest, window=max(e["completion_tokens"] for e in examples) + 1)
    saved.parent.mkdir(parents=True, exist_ok=True)
    keys = ("compute_dtype", "gradient_checkpointing", "batch_size", "grad_accum")
    saved.write_text(json.dumps({k: getattr(run_cfg, k) for k in keys}))
    return run_cfg


def choose(cfg: TrainSection, base_dir: Path, longest: int, window: int | None = None) -> TrainSection:
    """The section with "auto" choices replaced by what this machine and this data need."""
    dtype = measured_dtype(cfg.use_gpu) if cfg.compute_dtype == "auto" else cfg.compute_dtype
    checkpointing, window = cfg.gradient_checkpointing, window or longest
    shape = memory_plan.model_shape(base_dir)
    if checkpointing == "auto":
        # the memory plan's activations and answer logits of the longest batch, without recomputation
        off = cfg.model_copy(update={"compute_dtype": dtype, "gradient_checkpointing": False})
        plan = memory_plan.train_plan(shape, off, longest, window)
        need = plan.items["activations"] + plan.items["logits over the answers"]
        budget = device_memory(cfg.use_gpu, cfg.per_node) / 2
        checkpointing = need > budget
        console.print(
            f"gradient checkpointing {'on' if checkpointing else 'off'}: activations of the longest "
            f"batch ~{need / 1e9:.2f} GB against a budget of {budget / 1e9:.1f} GB"
        )
    run_cfg = cfg.model_copy(update={"compute_dtype": dtype, "gradient_checkpointing": checkpointing})
    return fitted_batch(run_cfg, shape, longest, window)


def fitted_batch(cfg: TrainSection, shape, longest: int, window: int) -> TrainSection:
    """The micro-batch the memory plan fits on this device (components.memory_plan), with the gradient
    accumulation that keeps the effective batch; the section as it is when the configured batch fits."""
    batch = fit_here(
        lambda b: memory_plan.train_plan(shape, cfg, longest, window, b),
        cfg.batch_size,
        "train.batch_size",
        cfg.use_gpu,
        cfg.per_node,
    )
    return cfg.model_copy(
        update={"batch_size": batch, "grad_accum": memory_plan.accumulation(cfg.batch_size, cfg.grad_accum, batch)}
    )


def device_memory(use_gpu: bool, processes: int = 1) -> float:
    """What one process may hold: the GPU's free memory, or the host's shared by the processes on it."""
    return free_memory(use_gpu) / (1 if use_gpu else processes)


def fit_here(plan_for, batch: int, setting: str, use_gpu: bool, processes: int = 1) -> int:
    """memory_plan.fit_batch against this device's memory: every stage's batch check before it loads a weight."""
    return memory_plan.fit_batch(plan_for, batch, device_memory(use_gpu, processes), setting)
