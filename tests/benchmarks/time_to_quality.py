"""Benchmark: wall-clock from start to 80% label accuracy on a held-out slice of BANKING77 train.

Ours is the `banking77` profile, run the way `llmops run --profile banking77` runs its first stages:
the data stage (no label list in the prompt, a 200-row validation slice held out of train), then the
train stage, which validates every eval_every steps and stops at the target accuracy or after
max_minutes. The clock starts before the data stage; the base-model conversion (cached, ~20 s cold)
is not counted. After training, the adapter it hands on is scored on the eval split, which neither
training nor early stopping saw.

The recipe (all 77 labels in every prompt, dataset padded to its longest row, plain collator) cannot be
run to 80% here: one epoch is ~15 hours on this machine. It is measured for a few steps, and its time
to 80% is estimated as the examples ours needed divided by the recipe's measured examples per second
(its first steps, warm-up included): what a recipe that learned as fast per example as ours would need.
`LLMOPS_TTQ_RESULT=path/to/result.json` renders the rows again from a finished run's saved result.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from tests.benchmarks import evaluation, training

TARGET_MINUTES = 60
RECIPE_STEPS, RECIPE_BATCH = int(os.environ.get("LLMOPS_TTQ_RECIPE_STEPS", "2")), 8
EVAL_EXAMPLES = int(os.environ.get("LLMOPS_TTQ_EVAL", "300"))


def ours(work: Path) -> dict:
    from components import prepare_data, train
    from pipelines.config import load_config

    extra = os.environ.get("LLMOPS_TTQ_OVERRIDES", "").split()  # e.g. "train.max_steps=4" for a quick try
    cfg = load_config(
        "banking77", [f"data.path={evaluation.BANKING77}", f"train.checkpoint_root={work / 'ck'}", *extra]
    )
    base = evaluation.base_dir()
    started = time.perf_counter()
    with evaluation.no_tracking():
        stats = prepare_data.run(cfg.data, base, work / "data")
        prepared = time.perf_counter() - started
        metrics = train.run(cfg.train, base, work / "data", work / "adapter")
    return {
        "cfg": cfg,
        "stats": stats,
        "prep_seconds": prepared,
        "train": metrics,
        "curve": json.loads((work / "adapter" / "validation_curve.json").read_text()),
    }


def held_out_accuracy(work: Path, cfg) -> dict:
    from components import inference, scoring
    from components.config import EvalSection
    from components.jsonl import read_jsonl
    from components.util import read_json

    tok = inference.load_tokenizer(evaluation.base_dir())
    model = inference.load_model(evaluation.base_dir(), "bfloat16", adapter_dir=work / "adapter")
    examples = read_jsonl(work / "data" / "eval.jsonl")[:EVAL_EXAMPLES]
    return scoring.score_model(
        model, tok, examples, EvalSection(batch_size=32), read_json(work / "data" / "labels.json"), "held-out"
    ).metrics


def recipe() -> dict:
    data = evaluation.banking77(label_list=True, max_tokens=1024)
    result, peak = training.run_recipe({"max_steps": RECIPE_STEPS, "batch_size": RECIPE_BATCH}, data)
    stats = json.loads((data / "stats.json").read_text())
    return {
        **result,
        "peak": peak,
        "tokens_per_example": stats["total_tokens"]["mean"],
        "examples_per_s": RECIPE_STEPS * RECIPE_BATCH / result["seconds"],
    }


def measure() -> dict:
    if os.environ.get("LLMOPS_TTQ_RESULT"):
        from pipelines.config import load_config

        saved = json.loads(Path(os.environ["LLMOPS_TTQ_RESULT"]).read_text())
        return {**saved, "cfg": load_config("banking77", [f"data.path={evaluation.BANKING77}"])}
    work = Path(tempfile.mkdtemp(prefix="bench-ttq-"))
    result = ours(work)
    result["held_out"] = held_out_accuracy(work, result["cfg"])
    result["recipe"] = recipe()
    saved = {k: v for k, v in result.items() if k != "cfg"}
    kept = evaluation.WORK / "time_to_quality.json"  # kept for LLMOPS_TTQ_RESULT, and if rows() fails
    kept.write_text(json.dumps(saved, indent=1, default=str))
    shutil.rmtree(work, ignore_errors=True)
    return result


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    cfg, train, curve, rec = result["cfg"], result["train"], result["curve"], result["recipe"]
    target = cfg.train.target_accuracy
    prep = result["prep_seconds"]
    hit = next((p for p in curve if p["accuracy"] >= target), None)
    minutes = (prep + hit["seconds"]) / 60 if hit else None
    examples_needed = (hit["step"] if hit else train["steps"]) * cfg.train.batch_size
    recipe_minutes = examples_needed / rec["examples_per_s"] / 60
    within = [p for p in curve if (prep + p["seconds"]) / 60 <= TARGET_MINUTES]
    ours_tokens = result["stats"]["total_tokens"]["mean"]
    return [
        (
            "setup",
            f"SmolLM2-135M QLoRA, profile banking77: {cfg.data.val_examples} validation rows, validated every "
            f"{cfg.train.eval_every} steps of batch {cfg.train.batch_size}, lr {cfg.train.learning_rate} "
            f"{cfg.train.lr_scheduler}, compute {train['compute_dtype']}, gradient checkpointing "
            f"{train['gradient_checkpointing']}, {os.cpu_count()} cores",
            "",
            "",
        ),
        (
            f"ours: minutes from start to {target:.0%} validation accuracy",
            f"{minutes:.1f}" if minutes else f"not reached in {(prep + curve[-1]['seconds']) / 60:.1f}",
            f"< {TARGET_MINUTES}",
            f"{TARGET_MINUTES / minutes:.2f}x" if minutes else "-",
        ),
        (
            (
                f"recipe: minutes to {target:.0%}, estimated"
                if hit
                else "recipe: minutes to train on as many examples as ours did, estimated"
            )
            + f" ({examples_needed} examples at its measured {rec['examples_per_s']:.3f} "
            "examples/s)",
            f"~{recipe_minutes:.0f}",
            "",
            f"~{recipe_minutes / minutes:.0f}x slower" if minutes else "-",
        ),
        (
            f"best validation accuracy within {TARGET_MINUTES} minutes"
            + (f" (the run stops once it reaches {target:.0%})" if hit else ""),
            f"{max(p['accuracy'] for p in within):.3f}" if within else "-",
            "",
            "",
        ),
        ("validation accuracy of the base model (step 0)", f"{curve[0]['accuracy']:.3f}", "", ""),
        (
            f"held-out eval split ({result['held_out']['n']} rows): label accuracy, constrained decoding",
            f"{result['held_out']['label_accuracy']:.3f}",
            "",
            "",
        ),
        (
            "held-out eval split: exact match of free generation / share of free answers not a label",
            f"{result['held_out']['exact_match']:.3f} / {result['held_out']['invalid_rate']:.3f}",
            "",
            "",
        ),
        (
            "tokens per example, ours / recipe (mean, prompt + answer)",
            f"{ours_tokens:.0f} / {rec['tokens_per_example']:.0f}",
            "",
            f"{rec['tokens_per_example'] / ours_tokens:.1f}x fewer",
        ),
        (
            "training examples per second, ours (validation time included) / recipe",
            f"{examples_needed / (hit or curve[-1])['seconds']:.2f} / {rec['examples_per_s']:.3f}",
            "",
            f"{examples_needed / (hit or curve[-1])['seconds'] / rec['examples_per_s']:.1f}x",
        ),
        (
            "curve (minutes: accuracy)",
            ", ".join(f"{(prep + p['seconds']) / 60:.0f}: {p['accuracy']:.2f}" for p in curve),
            "",
            "",
        ),
    ]
