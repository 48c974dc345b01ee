"""Run the `finetune` pipeline on this machine through kfp.local, with caching on."""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from components.environment import CACHE, CHECKPOINT_ROOT, EXPERIMENT, MLFLOW_PORT, RUN_STARTED, TRACKING_URI
from components.registry_tags import eval_tag, production_of
from components.util import console
from pipelines.config import PipelineConfig

DEFAULT_ROOT = Path(".llmops")
SUMMARY = "summary.json"  # in <root>/kfp/<run>/: the summary `llmops run` printed, wall time and budget included


def ensure_tracking(root: Path) -> str:
    """Use MLFLOW_TRACKING_URI if set; otherwise start (or reuse) the local server."""
    if TRACKING_URI.is_set():
        return TRACKING_URI.get()
    from pipelines import mlflow_local

    port = int(MLFLOW_PORT.get() or mlflow_local.DEFAULT_PORT)
    server = mlflow_local.start(root / "mlflow", port=port, detach=True)
    TRACKING_URI.set(server.url)
    console.print(
        f"MLflow UI: [bold]{server.url}[/] (local server, store in {root / 'mlflow'}; no login: it "
        "listens on 127.0.0.1 only, for this machine's user; the cluster's server asks for one)",
        soft_wrap=True,
    )
    return server.url


class PipelineFailed(RuntimeError):
    """A stage failed; `tasks` says which tasks ran, came from the cache, or failed before it stopped."""

    def __init__(self, message: str, tasks: dict[str, str]):
        super().__init__(message)
        self.tasks = tasks


class TaskOutcomes(logging.Filter):
    """Reads kfp.local's own log lines (kfp pinned at 2.17.0) for each task's fate: ran, cached or failed.

    kfp.local reports cache hits and failures only in its log, and replaces the root logger's handlers
    around every task, so this sits on the root logger itself as a filter, which it leaves in place.
    """

    PATTERNS = (
        (re.compile(r"^Task '?([\w-]+)'? cache hit"), "cached"),
        (re.compile(r"^Executing task '([\w-]+)'"), "running"),
        (re.compile(r"^Task '([\w-]+)' finished with status (SUCCESS|FAILURE)"), None),
    )

    def __init__(self):
        super().__init__()
        self.tasks: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())
        for pattern, outcome in self.PATTERNS:
            if match := pattern.search(text):
                self.tasks[match.group(1)] = outcome or ("ran" if match.group(2) == "SUCCESS" else "failed")
        return True

    def names(self, outcome: str) -> list[str]:
        return [name for name, value in self.tasks.items() if value == outcome]


@contextmanager
def watch_tasks():
    root = logging.getLogger()
    outcomes, level = TaskOutcomes(), root.level
    root.addFilter(outcomes)
    root.setLevel(logging.INFO)  # kfp.local logs cache hits at INFO outside its own logging context
    try:
        yield outcomes
    finally:
        root.removeFilter(outcomes)
        root.setLevel(level)


def failure_message(outcomes: TaskOutcomes) -> str:
    from pipelines.finetune import CACHED_TASKS

    failed = ", ".join(outcomes.names("failed")) or "a task"
    done = [name for name in outcomes.names("ran") + outcomes.names("cached") if name in CACHED_TASKS]
    kept = (
        (
            f"Finished stages stay in the cache ({', '.join(done)}): run the same command again after the fix and "
            f"only {failed} and the stages after it will run."
        )
        if done
        else "No stage finished."
    )
    return f"the pipeline stopped: {failed} failed (its log is above). {kept}"


def run_local(cfg: PipelineConfig, root: Path = DEFAULT_ROOT, verbose: bool = False) -> dict:
    """Run every stage as a kfp.local subprocess task; returns the registration summary.

    A failed stage raises PipelineFailed, naming the stages that finished; they are cached, so the same
    command re-runs only the failed stage and those after it (each task's cache key covers its own code).
    """
    from kfp import local

    from pipelines.finetune import build_pipeline
    from pipelines.run_output import quiet_kfp
    from pipelines.stage_rerun import ADAPTER

    started = time.time()  # the run's clock counts the MLflow server's start too: the user waits for it
    root = Path(root).resolve()
    uri = ensure_tracking(root)
    EXPERIMENT.set(cfg.registry.experiment)
    CHECKPOINT_ROOT.set_default(str(root / "checkpoints"))
    CACHE.set_default(str(root / "cache"))
    # The images are ours, not python:*, which kfp.local cannot know; the code comes from this venv.
    warnings.filterwarnings("ignore", message="You may be attemping")
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root / "kfp"),
        enable_caching=True,
        cache_root=str(root / "kfp-cache"),
    )
    # every task inherits the run's start: train.max_minutes is then the whole run's budget (components/run_budget.py)
    with RUN_STARTED.scoped(f"{started:.3f}"), watch_tasks() as outcomes, quiet_kfp(verbose):
        try:
            task = build_pipeline(cfg)()
        except RuntimeError as err:
            if not outcomes.names("failed"):
                raise
            raise PipelineFailed(failure_message(outcomes), dict(outcomes.tasks)) from err
    summary_file = Path(task.outputs["Output"].path)  # <root>/kfp/<run>/finalize/summary
    summary = json.loads(summary_file.read_text())
    summary.update(
        {
            "tracking_uri": uri,
            "wall_seconds": time.time() - started,
            "artifacts": str(root / "kfp"),
            "tasks": dict(outcomes.tasks),
        }
    )
    run_dir = summary_file.parent.parent
    budget = run_budget(run_dir / ADAPTER, summary["wall_seconds"])  # this run's own train
    if budget:
        summary["budget"] = budget
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2))  # what `llmops run` printed, for make bench
    return summary


def run_budget(adapter_dir: Path, wall_seconds: float) -> dict | None:
    """Where train.max_minutes was the run's budget, and training ran in this run (not from the cache): when it
    stopped on the run's clock, what it kept for the stages after it, and what they took."""
    from components.artifacts import TrainedAdapter

    trained = TrainedAdapter(adapter_dir)
    if not trained.metrics_file.exists():
        return None
    metrics = trained.metrics()
    if not metrics.budget_from_run_start:
        return None
    return {
        "train_stopped_at_seconds": metrics.budget_clock_seconds,
        "forecast_after_seconds": metrics.budget_forecast_after_seconds,
        "after_seconds": wall_seconds - metrics.budget_clock_seconds,
    }


def peak_stage(stages: dict) -> tuple[str, int] | None:
    """The stage whose process held the most resident memory, and how much (bytes); None where none recorded it."""
    peaks = {name: info["peak_rss_bytes"] for name, info in stages.items() if info.get("peak_rss_bytes")}
    return max(peaks.items(), key=lambda item: item[1]) if peaks else None


def print_summary(summary: dict) -> None:
    from rich.table import Table

    console.rule("[bold green]llmops · done")
    console.print(
        f"registered [bold]{summary['name']}[/] version [bold]{summary['version']}[/]"
        + (" (already registered for this run)" if summary.get("reused") else "")
    )
    table = Table("metric", "base", "adapter on 16-bit base", f"served (--quantize {summary.get('quantize', '?')})")
    for metric in ("exact_match", "label_accuracy", "perplexity"):
        if eval_tag("tuned", metric) in summary:
            table.add_row(
                metric,
                *(
                    f"{summary[eval_tag(who, metric)]:.3f}" if eval_tag(who, metric) in summary else ""
                    for who in ("base", "adapter", "tuned")
                ),
            )
    console.print(table)
    console.print(
        f"served figures on {summary.get(eval_tag('tuned', 'examples'), '?')} eval rows; base and adapter on "
        f"{summary.get(eval_tag('base', 'examples'), '?')}. Gate: {summary.get('gate', 'see the version tags')}"
    )
    stages = Table("stage", "seconds", "peak memory (GB)", "cached")
    for name, info in summary.get("stages", {}).items():
        peak = info.get("peak_rss_bytes")
        stages.add_row(
            name, f"{info['seconds']:.1f}", f"{peak / 1e9:.2f}" if peak else "", "yes" if info["cached"] else ""
        )
    console.print(stages)
    if top := peak_stage(summary.get("stages", {})):
        console.print(
            f"peak memory {top[1] / 1e9:.2f} GB, set by the {top[0]} stage (its process's high-water mark)",
            soft_wrap=True,
        )
    for outcome, label in (("ran", "ran"), ("cached", "from the kfp cache (same inputs and code)")):
        names = [name for name, value in summary.get("tasks", {}).items() if value == outcome]
        console.print(f"{label}: {', '.join(names) or 'none'}", soft_wrap=True)
    if budget := summary.get("budget"):
        console.print(
            f"run budget (train.max_minutes): training stopped {budget['train_stopped_at_seconds'] / 60:.1f} min "
            f"into the run, keeping {budget['forecast_after_seconds'] / 60:.1f} min for the stages after it; they "
            f"took {budget['after_seconds'] / 60:.1f} min",
            soft_wrap=True,
        )
    console.print(
        f"pipeline wall time {summary['wall_seconds']:.0f}s · model: models:/{summary['name']}/{summary['version']}"
        f" · artifacts in {summary['artifacts']}",
        soft_wrap=True,
    )
    for line in next_steps(summary):
        console.print(line, soft_wrap=True)


def next_steps(summary: dict) -> list[str]:
    """MLflow links to the registration run and the version, and the commands that deploy it and ask it."""
    uri, name, version = summary["tracking_uri"], summary["name"], summary["version"]
    lines = []
    if uri.startswith("http"):
        from mlflow import MlflowClient

        experiment = MlflowClient().get_run(summary["run_id"]).info.experiment_id if summary.get("run_id") else None
        if experiment:
            lines.append(f"MLflow run:     {uri}/#/experiments/{experiment}/runs/{summary['run_id']}")
        lines.append(f"model version:  {uri}/#/models/{name}/versions/{version}")
    passed = str(summary.get("gate", "")).startswith("passed")
    production = production_of(name) or name
    why = '--reason "why it should serve"' if passed else '--override "why it should serve anyway"'
    lines.append(
        "next: "
        + ("" if passed else "the gate did not pass, so promotion refuses it without an override; to try it, ")
        + f"`llmops deployer &` then `llmops promote {name} {version} {why}` (copies it into {production}, "
        + f'alias champion) and `llmops chat "your question" --model {production}@champion`; '
        + f"or `llmops serve models:/{name}/{version}`"
    )
    return lines
