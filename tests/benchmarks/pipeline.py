"""Benchmark: `llmops run` on the demo data from a cold pipeline cache, the way `make run` starts it.

Measures wall time, peak memory of the whole process tree (the kfp.local task subprocesses
included, the MLflow server excluded), and each stage's wall time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from tests.benchmarks.limits import sampled

TARGET_SECONDS = 600
TARGET_BYTES = 6e9


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            if "mlflow" not in " ".join(p.cmdline()[:4]):
                total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_fresh(extra: list[str] | None = None, env: dict | None = None) -> tuple[Path, int, float]:
    """`llmops run` in a new root (its own MLflow server, stopped after): the root, peak tree RSS and wall time."""
    root = Path(tempfile.mkdtemp(prefix="llmops-bench-"))
    cmd = [sys.executable, "-m", "llmops", "run", "--root", str(root), *(extra or [])]
    try:
        _, peak, wall = sampled(cmd, {**os.environ, "LLMOPS_MLFLOW_PORT": "5099", **(env or {})}, rss=_tree_rss)
    finally:
        subprocess.run([sys.executable, "-m", "llmops", "mlflow-stop", "--root", str(root)], capture_output=True)
    return root, peak, wall


def measure(extra: list[str] | None = None, warm_base_cache: Path | None = None) -> dict:
    root, peak, wall = run_fresh(extra, {"LLMOPS_CACHE": str(warm_base_cache)} if warm_base_cache else None)
    registration = sorted(root.glob("kfp/finetune-*/register/registration"))[-1]
    summary = json.loads(registration.read_text())
    return {
        "wall_seconds": wall,
        "peak_rss_bytes": peak,
        "stages": summary["stages"],
        "base_exact_match": summary["eval.base.exact_match"],
        "tuned_exact_match": summary["eval.tuned.exact_match"],
    }


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    """(measure, value, target, ratio of target to value: above 1 meets it)."""
    out = [
        (
            "make run wall time (s)",
            f"{result['wall_seconds']:.0f}",
            f"{TARGET_SECONDS}",
            f"{TARGET_SECONDS / result['wall_seconds']:.2f}x",
        ),
        (
            "make run peak memory (GB)",
            f"{result['peak_rss_bytes'] / 1e9:.2f}",
            f"{TARGET_BYTES / 1e9:.2f}",
            f"{TARGET_BYTES / max(result['peak_rss_bytes'], 1):.2f}x",
        ),
    ]
    for stage, info in result["stages"].items():
        out.append((f"stage {stage} (s)", f"{info['seconds']:.1f}", "", ""))
    out.append(
        ("exact match base → tuned", f"{result['base_exact_match']:.3f} → {result['tuned_exact_match']:.3f}", "", "")
    )
    return out
