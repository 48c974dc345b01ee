"""MLflow logging for stages. Each stage that does work opens its own MLflow run.

The tracking URI comes from MLFLOW_TRACKING_URI (set by `llmops run` or the cluster), never from
the stage's config section, so moving the server does not invalidate the kfp cache. With no URI
set (unit tests, a bare library call) nothing is logged.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

EXPERIMENT_ENV = "LLMOPS_EXPERIMENT"
# MLflow's client already retries every REST call (urllib3 Retry on connection errors, 429 and 5xx, for
# any method) with exponential backoff; we pin its settings rather than loop ourselves. urllib3 retries
# the first failure at once, then waits 4, 8, 16, 32, 64 s (+ up to 1 s jitter): about 2 minutes, enough
# for the server's pod to be rescheduled or restarted. Bounded, so a server that stays down fails the
# stage with a clear connection error that kfp's retry policy and the operator can see, instead of a
# step that hangs on a dead endpoint. An explicit setting in the environment wins.
RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "6", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
             "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "120"}


def configure_retries() -> None:
    """Read by mlflow on every request, so setting them before the first call is enough."""
    for name, value in RETRY_ENV.items():
        os.environ.setdefault(name, value)


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def numeric(data: dict) -> dict[str, float]:
    return {k: float(v) for k, v in flatten(data).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """Thin handle on the active MLflow run; every method is a no-op when tracking is off."""

    def __init__(self, mlflow=None, run_id: str | None = None):
        self.mlflow = mlflow
        self.run_id = run_id

    def log_stats(self, stats: dict, prefix: str, step: int | None = None) -> None:
        if self.mlflow:
            self.mlflow.log_metrics({f"{prefix}.{k}": v for k, v in numeric(stats).items()}, step=step)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.mlflow:
            self.mlflow.log_metrics(numeric(metrics), step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.mlflow and Path(path).exists():
            log = self.mlflow.log_artifacts if Path(path).is_dir() else self.mlflow.log_artifact
            log(str(path), artifact_path)

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        if self.mlflow and rows:
            columns = {key: [row.get(key) for row in rows] for key in rows[0]}
            self.mlflow.log_table(data=columns, artifact_file=artifact_file)

    def set_tags(self, tags: dict) -> None:
        if self.mlflow:
            self.mlflow.set_tags({k: str(v) for k, v in tags.items()})


def tracking_enabled() -> bool:
    return bool(os.environ.get("MLFLOW_TRACKING_URI"))


@contextmanager
def stage_run(stage: str, params: dict, tags: dict | None = None):
    """An MLflow run for one stage; marked FAILED if the stage raises."""
    if not tracking_enabled():
        yield Tracker()
        return
    import mlflow

    configure_retries()
    mlflow.set_experiment(os.environ.get(EXPERIMENT_ENV, "llmops"))
    with mlflow.start_run(run_name=stage, tags={"llmops.stage": stage, **(tags or {})}) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        yield Tracker(mlflow, run.info.run_id)
