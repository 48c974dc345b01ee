"""Run the `finetune` pipeline on this machine through kfp.local, with caching on."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from components.config import PipelineConfig
from components.tracking import EXPERIMENT_ENV
from components.util import console

DEFAULT_ROOT = Path(".llmops")


def ensure_tracking(root: Path) -> str:
    """Use MLFLOW_TRACKING_URI if set; otherwise start (or reuse) the local server."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from pipelines import mlflow_local

    port = int(os.environ.get("LLMOPS_MLFLOW_PORT", mlflow_local.DEFAULT_PORT))
    server = mlflow_local.start(root / "mlflow", port=port, detach=True)
    os.environ["MLFLOW_TRACKING_URI"] = server.url
    console.print(f"MLflow UI: [bold]{server.url}[/] (local server, store in {root / 'mlflow'})")
    return server.url


def run_local(cfg: PipelineConfig, root: Path = DEFAULT_ROOT) -> dict:
    """Run every stage as a kfp.local subprocess task; returns the registration summary."""
    from kfp import local

    from pipelines.finetune import build_pipeline

    root = Path(root).resolve()
    uri = ensure_tracking(root)
    os.environ[EXPERIMENT_ENV] = cfg.registry.experiment
    os.environ.setdefault("LLMOPS_CHECKPOINT_ROOT", str(root / "checkpoints"))
    os.environ.setdefault("LLMOPS_CACHE", str(root / "cache"))
    # The images are ours, not python:*, which kfp.local cannot know; the code comes from this venv.
    warnings.filterwarnings("ignore", message="You may be attemping")
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp"),
               enable_caching=True, cache_root=str(root / "kfp-cache"))
    started = time.time()
    task = build_pipeline(cfg)()
    summary = json.loads(Path(task.outputs["Output"].path).read_text())
    summary.update({"tracking_uri": uri, "wall_seconds": time.time() - started, "artifacts": str(root / "kfp")})
    return summary


def print_summary(summary: dict) -> None:
    from rich.table import Table

    console.rule("[bold green]llmops · done")
    console.print(f"registered [bold]{summary['name']}[/] version [bold]{summary['version']}[/]"
                  + (" (already registered for this run)" if summary.get("reused") else ""))
    table = Table("metric", "base", "tuned")
    for metric in ("exact_match", "perplexity"):
        table.add_row(metric, f"{summary[f'eval.base.{metric}']:.3f}", f"{summary[f'eval.tuned.{metric}']:.3f}")
    console.print(table)
    stages = Table("stage", "seconds", "cached")
    for name, info in summary.get("stages", {}).items():
        stages.add_row(name, f"{info['seconds']:.1f}", "yes" if info["cached"] else "")
    console.print(stages)
    console.print(f"pipeline wall time {summary['wall_seconds']:.0f}s · MLflow UI {summary['tracking_uri']} · "
                  f"model: models:/{summary['name']}/{summary['version']} · artifacts in {summary['artifacts']}")
