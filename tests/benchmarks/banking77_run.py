"""Benchmark: the README's BANKING77 command end to end, beside the targets of issue 29.

Runs `llmops run --data DATA --profile banking77` (as `make run DATA=... ARGS="--profile banking77"` does) from a
cold pipeline cache in a fresh root, and reads the summary the run printed (`<root>/kfp/<run>/summary.json`): the
whole run's wall time (from before the MLflow server starts), the served model's label accuracy on the eval rows,
when training stopped on the run's budget and what the stages after it took against the forecast, and each stage's
seconds and peak resident memory (its process's high-water mark), naming the stage that set the peak. DATA is
LLMOPS_BENCH_BANKING77, by default `../shared/data/banking77/train.csv` beside the checkout.
`LLMOPS_BENCH_B77_RUN=<root>/kfp/finetune-<time>` renders the rows from a finished run's summary instead of
running (for instance the one a user's `make run` left).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from components.registry_tags import eval_tag
from pipelines.run import SUMMARY, peak_stage
from tests.benchmarks import pipeline

ROOT = Path(__file__).resolve().parents[2]
TARGET_MINUTES = 45.0
TARGET_ACCURACY = 0.90
TARGET_AFTER_SECONDS = 180.0  # evaluate, merge, quantize and register together
TARGET_PEAK_BYTES = 6e9


def measure() -> dict:
    if finished := os.environ.get("LLMOPS_BENCH_B77_RUN"):
        return json.loads((Path(finished) / SUMMARY).read_text())
    data = Path(os.environ.get("LLMOPS_BENCH_BANKING77", ROOT.parent / "shared/data/banking77/train.csv"))
    if not data.is_file():
        raise FileNotFoundError(f"{data}: no BANKING77 train.csv (set LLMOPS_BENCH_BANKING77)")
    root, _, _ = pipeline.run_fresh(["--data", str(data), "--profile", "banking77"])
    return json.loads(sorted(root.glob(f"kfp/finetune-*/{SUMMARY}"))[-1].read_text())


def rows(summary: dict) -> list[tuple[str, str, str, str]]:
    """(measure, value, target, target over value or value over target: above 1 meets it)."""
    minutes = summary["wall_seconds"] / 60
    served = summary[eval_tag("tuned", "label_accuracy")]
    stages = summary["stages"]
    out = [
        ("whole run, wall time (min)", f"{minutes:.1f}", f"≤ {TARGET_MINUTES:.0f}", f"{TARGET_MINUTES / minutes:.2f}x"),
        (
            f"served model (--quantize {summary.get('quantize', '?')}): label accuracy on "
            f"{summary.get(eval_tag('tuned', 'examples'), '?')} eval rows",
            f"{served:.3f}",
            f"≥ {TARGET_ACCURACY:.2f}",
            f"{served / TARGET_ACCURACY:.3f}x",
        ),
        (
            "label accuracy: base / adapter on the 16-bit base",
            f"{summary[eval_tag('base', 'label_accuracy')]:.3f} / {summary[eval_tag('adapter', 'label_accuracy')]:.3f}",
            "",
            "",
        ),
    ]
    if budget := summary.get("budget"):
        after = budget["after_seconds"]
        out += [
            ("training stopped on the run's budget at (min)", f"{budget['train_stopped_at_seconds'] / 60:.1f}", "", ""),
            (
                "stages after training, all (s): forecast / took",
                f"{budget['forecast_after_seconds']:.0f} / {after:.0f}",
                f"≤ {TARGET_AFTER_SECONDS:.0f}",
                f"{TARGET_AFTER_SECONDS / after:.2f}x",
            ),
        ]
    if top := peak_stage(stages):
        out.append(
            (
                f"peak memory (GB), set by {top[0]}",
                f"{top[1] / 1e9:.2f}",
                f"≤ {TARGET_PEAK_BYTES / 1e9:.0f}",
                f"{TARGET_PEAK_BYTES / top[1]:.2f}x",
            )
        )
    for stage, info in stages.items():
        peak = f", {info['peak_rss_bytes'] / 1e9:.2f} GB" if info.get("peak_rss_bytes") else ""
        out.append((f"stage {stage} (s, peak memory)", f"{info['seconds']:.1f}{peak}", "", ""))
    return out
