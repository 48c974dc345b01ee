"""Choices about compute made by measurement on the machine that trains: the dtype, and whether
activations need recomputing (gradient checkpointing) to fit in memory."""

from __future__ import annotations

import time
from pathlib import Path

from components.artifacts import PreparedData
from components.config import TrainSection
from components.util import console

# Activation bytes per token per layer for a 16-bit transformer block, from Korthikanti et al. (2022),
# "Reducing Activation Recomputation in Large Transformer Models": 34 * hidden (attention scores aside).
ACTIVATION_BYTES_PER_HIDDEN = 34


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


def activation_bytes(cfg: TrainSection, model_config, longest: int, dtype: str, window: int) -> float:
    """window: the positions that get logits (train computes them for the answers only)."""
    width = 2 if dtype == "bfloat16" else 4
    per_layer = ACTIVATION_BYTES_PER_HIDDEN * model_config.hidden_size * width / 2
    tokens = cfg.batch_size * longest
    logits = cfg.batch_size * window * model_config.vocab_size * 4 * 3  # float32 logits, softmax, gradient
    return model_config.num_hidden_layers * tokens * per_layer + logits


def free_memory(use_gpu: bool) -> float:
    if use_gpu:
        import torch

        return float(torch.cuda.mem_get_info()[0])
    import psutil

    return float(psutil.virtual_memory().available)


def resolved_choices(cfg: TrainSection, base_dir: Path, data_dir: Path, root: Path) -> TrainSection:
    """The "auto" choices of this run, measured once and kept beside its checkpoints.

    A restarted or data-parallel worker reads them back instead of measuring again: a noisy timing must
    not switch a resumed run to another dtype, or give two ranks different ones.
    """
    import json

    saved = Path(root) / "resolved.json"
    if saved.exists():
        return cfg.model_copy(update=json.loads(saved.read_text()))
    examples = PreparedData(data_dir).examples("train")
    longest = max(e["prompt_tokens"] + e["completion_tokens"] for e in examples)
    run_cfg = resolve(cfg, base_dir, longest, window=max(e["completion_tokens"] for e in examples) + 1)
    saved.parent.mkdir(parents=True, exist_ok=True)
    keys = ("compute_dtype", "gradient_checkpointing", "batch_size", "grad_accum")
    saved.write_text(json.dumps({k: getattr(run_cfg, k) for k in keys}))
    return run_cfg


def resolve(cfg: TrainSection, base_dir: Path, longest: int, window: int | None = None) -> TrainSection:
    """The section with "auto" choices replaced by what this machine and this data need."""
    from transformers import AutoConfig

    dtype = measured_dtype(cfg.use_gpu) if cfg.compute_dtype == "auto" else cfg.compute_dtype
    checkpointing = cfg.gradient_checkpointing
    if checkpointing == "auto":
        need = activation_bytes(cfg, AutoConfig.from_pretrained(base_dir), longest, dtype, window or longest)
        budget = free_memory(cfg.use_gpu) / 2 / (1 if cfg.use_gpu else cfg.num_processes)
        checkpointing = need > budget
        console.print(
            f"gradient checkpointing {'on' if checkpointing else 'off'}: activations of the longest "
            f"batch ~{need / 1e9:.2f} GB against a budget of {budget / 1e9:.1f} GB"
        )
    run_cfg = cfg.model_copy(update={"compute_dtype": dtype, "gradient_checkpointing": checkpointing})
    return fitted_batch(run_cfg, base_dir, longest, window or longest)


def fitted_batch(cfg: TrainSection, base_dir: Path, longest: int, window: int) -> TrainSection:
    """The micro-batch the memory plan fits on this device (components.memory_plan), with the gradient
    accumulation that keeps the effective batch; the section as it is when the configured batch fits."""
    from components import memory_plan

    shape = memory_plan.model_shape(base_dir)
    available = memory_plan.available_bytes(cfg.use_gpu) / (1 if cfg.use_gpu else cfg.num_processes)
    batch = memory_plan.fit_batch(
        lambda b: memory_plan.train_plan(shape, cfg, longest, window, b), cfg.batch_size, available, "train.batch_size"
    )
    accum = -(-cfg.batch_size * cfg.grad_accum // batch)
    return cfg.model_copy(update={"batch_size": batch, "grad_accum": accum})
