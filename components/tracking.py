"""MLflow logging for stages. Each stage that does work opens its own MLflow run.

The tracking URI comes from MLFLOW_TRACKING_URI (set by `llmops run` or the cluster), never from
the stage's config section, so moving the server does not invalidate the kfp cache. With no URI
set (unit tests, a bare library call) nothing is logged.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path

from components.environment import MLFLOW_RETRIES, TRACKING_URI, experiment

# MLflow's client already retries every REST call (urllib3 Retry on connection errors, 429 and 5xx, for
# any method) with exponential backoff; we pin its settings rather than loop ourselves. urllib3 retries
# the first failure at once, then waits 4, 8, 16, 32, 64 s (+ up to 1 s jitter): about 2 minutes, enough
# for the server's pod to be rescheduled or restarted. Bounded, so a server that stays down fails the
# stage with a clear connection error that kfp's retry policy and the operator can see, instead of a
# step that hangs on a dead endpoint. An explicit setting in the environment wins (MLFLOW_RETRIES).


def configure_retries() -> None:
    """Read by mlflow on every request, so setting them before the first call is enough."""
    for name, value in MLFLOW_RETRIES.items():
        os.environ.setdefault(name, value)


# MLflow accepts metric, param and tag names of word characters, "_", "-", ".", " ", ":" and "/", at most 250
# long, that do not resolve to another path. Strings from data (BANKING77 has "reverted_card_payment?") become
# names here, so anything else becomes "_"; "/" and ":" too, since a label's "/" would nest the name in the
# UI and ":" is refused on Windows. Exact strings stay in the reports and in the renames artifact.
UNSAFE = re.compile(r"[^\w.\- ]")
MAX_NAME = 250
RENAMES_FILE = "metric_names.json"


def safe_name(name: str) -> str:
    """A valid MLflow key that reads like `name`; unchanged when `name` is valid already."""
    safe = UNSAFE.sub("_", str(name)).strip() or "_"
    if safe.startswith("."):  # "." and "..x" would resolve to other paths
        safe = "_" + safe
    if len(safe) > MAX_NAME:
        safe = safe[: MAX_NAME - 9] + "-" + short_hash(name)
    return safe


def short_hash(name: str) -> str:
    return hashlib.sha256(str(name).encode()).hexdigest()[:8]


def safe_names(data: dict) -> tuple[dict, dict[str, str]]:
    """(data under valid MLflow keys, {new key: original} for each key that changed).

    Keys that would land on the same name (`card?` and `card!`, or `card?` beside a real `card_`) keep it
    only if they were valid already; every other one gets a short hash of the original, so no value is lost
    or overwritten and the same key always maps to the same name.
    """
    groups: dict[str, list[str]] = {}
    for key in data:
        groups.setdefault(safe_name(key), []).append(key)
    out, renamed = {}, {}
    for safe, keys in groups.items():
        for key in keys:
            name = safe if len(keys) == 1 or key == safe else f"{safe[: MAX_NAME - 9]}-{short_hash(key)}"
            out[name] = data[key]
            if name != key:
                renamed[name] = key
    return out, renamed


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
    """Thin handle on the active MLflow run; every method is a no-op when tracking is off.

    Every name goes through safe_names; the renames are kept and logged as one artifact when the run ends.
    """

    def __init__(self, mlflow=None, run_id: str | None = None):
        self.mlflow = mlflow
        self.run_id = run_id
        self.renamed: dict[str, str] = {}

    def _safe(self, data: dict) -> dict:
        safe, renamed = safe_names(data)
        self.renamed.update(renamed)
        return safe

    def log_stats(self, stats: dict, prefix: str, step: int | None = None) -> None:
        self.log_metrics({f"{prefix}.{k}": v for k, v in numeric(stats).items()}, step=step)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.mlflow:
            self.mlflow.log_metrics(self._safe(numeric(metrics)), step=step)

    def log_params(self, params: dict) -> None:
        if self.mlflow:
            self.mlflow.log_params(self._safe({k: str(v)[:500] for k, v in flatten(params).items()}))

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
            self.mlflow.set_tags(self._safe({k: str(v) for k, v in tags.items()}))

    def log_renames(self) -> None:
        """Which MLflow name stands for which original string, for anyone reading the metrics."""
        if self.mlflow and self.renamed:
            self.mlflow.log_dict(dict(sorted(self.renamed.items())), RENAMES_FILE)


def tracking_enabled() -> bool:
    return TRACKING_URI.is_set()


@contextmanager
def stage_run(stage: str, params: dict, tags: dict | None = None):
    """An MLflow run for one stage; marked FAILED if the stage raises."""
    if not tracking_enabled():
        yield Tracker()
        return
    import mlflow

    configure_retries()
    mlflow.set_experiment(experiment("llmops"))
    with mlflow.start_run(run_name=stage, tags={"llmops.stage": stage, **safe_names(tags or {})[0]}) as run:
        tracker = Tracker(mlflow, run.info.run_id)
        tracker.log_params(params)
        try:
            yield tracker
        finally:
            tracker.log_renames()
