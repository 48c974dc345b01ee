"""Benchmark: our batched evaluation (`components.inference.generate`, batch 32, left padding) against the
recipe's one-at-a-time `model.generate` loop, on the same BANKING77 eval examples with SmolLM2.

Both sides run in this process with the same weights, dtype and max_new_tokens; the sides alternate
over the repeats so drift in the machine's speed (thermal, a neighbour) hits both alike. The
predictions are compared: batching must not change what the model answers.

The helpers here (base model, prepared BANKING77) are shared by the other model benchmarks.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from components.config import EvalSection

BANKING77 = Path(os.environ.get("LLMOPS_BANKING77", "/work/shared/data/banking77/train.csv"))
EXAMPLES = 128
BATCH = EvalSection().batch_size  # the evaluate stage's default
REPEATS = 2
# Intra-op threads for every model benchmark: all cores on a quiet machine. On a machine shared with
# other jobs set LLMOPS_BENCH_THREADS=1: two OpenMP threads then wait on each other at every barrier,
# and batch-1 decoding ran 14x slower than with one (2026-11-23, load average 5 on 2 cores).
THREADS = int(os.environ.get("LLMOPS_BENCH_THREADS", os.cpu_count() or 1))
# float32, not the evaluate stage's bfloat16 default: in bf16 a padded row of a batch rounds differently
# from the same row alone and greedy answers drift (48/64 identical for the untuned model on 2026-11-23),
# which would hide a real batching bug behind numerics; fp32 keeps the equality check about the code.
DTYPE = "float32"
# The benchmarks' own scratch space: prepared data and the base model copy are reused across sections.
WORK = Path(tempfile.gettempdir()) / "llmops-bench-models"


@contextmanager
def no_tracking():
    """Stage functions log to MLflow when a URI is set; a benchmark's calls must not add stage runs."""
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def base_dir() -> Path:
    """The packaged SmolLM2 as our 16-bit directory (bfloat16, distinct pad), from the base-model cache."""
    from components.config import ModelSection
    from components.stages import base_model

    out = WORK / "smollm2"
    if not (out / "llmops_base.json").exists():
        base_model.run(ModelSection(), out)
    return out


def banking77(label_list: bool = False, **extra) -> Path:
    """BANKING77 prepared by our data stage; label_list=True renders all 77 labels into every prompt."""
    from components.config import DataSection
    from components.stages import prepare_data

    cfg = DataSection(path=str(BANKING77), label_list_in_prompt=label_list, **extra)
    out = WORK / f"banking77-{cfg.digest()}"
    if not (out / "eval.jsonl").exists():
        with no_tracking():
            prepare_data.run(cfg, base_dir(), out)
    return out


def pin_threads() -> None:
    import torch

    torch.set_num_threads(THREADS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)  # for any subprocess started from here


def eval_examples(n: int = EXAMPLES) -> tuple[list[dict], list[str]]:
    from components.jsonl import read_jsonl
    from components.util import read_json

    data = banking77()
    return read_jsonl(data / "eval.jsonl")[:n], read_json(data / "labels.json")


def label_budget(tok, labels: list[str]) -> int:
    """score_model's own cap for label tasks: the longest label's tokens plus two."""
    return max(len(tok(lab, add_special_tokens=False)["input_ids"]) for lab in labels) + 2


def recipe(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The widely copied loop: one prompt at a time, batch 1, no padding."""
    import torch

    out = []
    with torch.inference_mode():
        for prompt in prompts:
            enc = tok(prompt, return_tensors="pt")
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            out.append(tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out


def measure() -> dict:
    from components.inference import generate, load_model, load_tokenizer
    from components.util import quiet_libraries

    quiet_libraries()
    pin_threads()
    examples, labels = eval_examples()
    prompts = [e["prompt"] for e in examples]
    model_dir = base_dir()
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, DTYPE)
    max_new = label_budget(tok, labels)
    # The recipe tokenizes with the defaults; it is only the same input if that adds no special tokens.
    if tok(prompts[0])["input_ids"] != tok(prompts[0], add_special_tokens=False)["input_ids"]:
        raise RuntimeError("the tokenizer adds special tokens: the two sides would not see the same input")
    sides = {
        "recipe": lambda: recipe(model, tok, prompts, max_new),
        "ours": lambda: generate(model, tok, prompts, max_new, BATCH, progress="bench batched"),
    }
    recipe(model, tok, prompts[:1], 2)  # one-time start-up costs (first kernels) belong to neither side
    times = {name: [] for name in sides}
    preds: dict[str, list[str]] = {}
    for rep in range(REPEATS):
        for name in list(sides) if rep % 2 == 0 else list(sides)[::-1]:
            started = time.perf_counter()
            preds[name] = sides[name]()
            times[name].append(time.perf_counter() - started)
    same = sum(a == b for a, b in zip(preds["recipe"], preds["ours"]))
    from components.inference import normalize

    correct = {
        name: sum(normalize(p) == normalize(e["answer"]) for p, e in zip(preds[name], examples)) for name in sides
    }
    result = {
        "n": len(prompts),
        "max_new": max_new,
        "times": times,
        "same": same,
        "correct": correct,
        "mismatches": [(a, b) for a, b in zip(preds["recipe"], preds["ours"]) if a != b][:3],
    }
    if same != len(prompts):
        # Reported in the table rather than raised when it is rare: a row's result in a padded batch
        # can differ by rounding even in float32. A large share means a real bug, so that does raise.
        print(f"predictions differ on {len(prompts) - same}/{len(prompts)}: {result['mismatches']}")
        if same < 0.9 * len(prompts):
            raise RuntimeError(f"batched predictions match the recipe on only {same}/{len(prompts)}")
    return result


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    n = result["n"]
    rate = {name: n / min(t) for name, t in result["times"].items()}
    speedup = rate["ours"] / rate["recipe"]
    return [
        (
            f"recipe: model.generate per example, batch 1 (examples/s; best of {REPEATS})",
            f"{rate['recipe']:.2f}",
            "",
            "1.00x",
        ),
        (
            f"ours: inference.generate, batch {BATCH}, left padding, length-sorted (examples/s; best of {REPEATS})",
            f"{rate['ours']:.2f}",
            "≥ 5x",
            f"{speedup:.2f}x",
        ),
        (
            f"setup: {n} BANKING77 eval examples, SmolLM2 base, {DTYPE}, greedy, max_new_tokens {result['max_new']}, "
            f"{THREADS} intra-op thread",
            "",
            "",
            "",
        ),
        ("predictions identical to the recipe's (checked; raises below 90%)", f"{result['same']}/{n}", f"{n}/{n}", ""),
        (
            "exact match, recipe / ours (untuned base model)",
            f"{result['correct']['recipe'] / n:.3f} / {result['correct']['ours'] / n:.3f}",
            "",
            "",
        ),
    ]
