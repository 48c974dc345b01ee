"""What the thin kfp components share: publishing metrics so kfp.local can cache them, and timing."""

from __future__ import annotations

import json
import time
from pathlib import Path

from components.artifacts import TIMING
from components.tracking import numeric, safe_names
from components.util import peak_rss_bytes


def publish(metrics, values: dict, out_dir: str, stage: str, started: float) -> None:
    """Log numeric values on a kfp Metrics artifact and write them to its file too.

    kfp.local only caches a task whose outputs exist as files, and log_metric writes none.
    """
    seconds = time.time() - started
    for key, value in safe_names(numeric(values))[0].items():  # the same names as in MLflow
        metrics.log_metric(key, value)
    metrics.log_metric("wall_seconds", seconds)
    Path(metrics.path).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics.path).write_text(json.dumps(metrics.metadata, sort_keys=True))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "seconds": seconds, "finished": time.time(), "peak_rss_bytes": peak_rss_bytes()}
    (Path(out_dir) / TIMING).write_text(json.dumps(record))


def publish_confusion(artifact, report: dict) -> None:
    confusion = report["tuned"].get("confusion")  # the evaluate stage's report, as components.reports.Eval dumps it
    if confusion:
        artifact.log_confusion_matrix(confusion["categories"], confusion["matrix"])
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(artifact.metadata))


def stage_timings(paths: dict[str, str], run_root: Path) -> dict:
    """Seconds and peak resident memory per stage, and whether its output came from the kfp cache (it lives in
    another run, whose figures these are)."""
    out = {}
    for name, path in paths.items():
        timing = Path(path) / TIMING
        if timing.exists():
            record = json.loads(timing.read_text())
            out[record["stage"]] = {
                "seconds": round(record["seconds"], 1),
                "cached": run_root not in Path(path).resolve().parents,
                "peak_rss_bytes": record.get("peak_rss_bytes"),  # None: written before 2026-12-06
            }
    return out
