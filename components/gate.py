"""The promotion gate: compare the candidate with the base model and the current champion.

Either way the verdict and the deltas become version tags; a candidate that passes gets the
`challenger` alias (in the pipeline's dsl.If branch), one that fails stays registered without an alias.
The champion is measured on the candidate's own eval split unless both were evaluated on the same data.
"""

from __future__ import annotations

from pathlib import Path

from components.config import EvalSection, GateSection
from components.jsonl import read_jsonl
from components.tracking import configure_retries
from components.util import console, heading, read_json

LOWER_IS_BETTER = {"perplexity"}


def gain(metric: str, candidate: float, reference: float) -> float:
    """Positive when the candidate is better, whatever the metric's direction."""
    return reference - candidate if metric in LOWER_IS_BETTER else candidate - reference


def decide(cfg: GateSection, candidate: float, base: float, champion: float | None) -> dict:
    over_base = gain(cfg.metric, candidate, base)
    over_champion = None if champion is None else gain(cfg.metric, candidate, champion)
    reasons = []
    if over_base < cfg.min_gain_over_base:
        reasons.append(f"{cfg.metric} gain over base {over_base:+.4f} < {cfg.min_gain_over_base:+.4f}")
    if over_champion is not None and over_champion < cfg.min_gain_over_champion:
        reasons.append(f"{cfg.metric} gain over champion {over_champion:+.4f} < {cfg.min_gain_over_champion:+.4f}")
    return {"passed": not reasons, "metric": cfg.metric, "candidate": candidate, "base": base, "champion": champion,
            "gain_over_base": over_base, "gain_over_champion": over_champion,
            "reason": "; ".join(reasons) or "beats the base" + (" and the champion" if champion is not None else "")}


def champion_score(client, name: str, cfg: GateSection, candidate_version: str, data_dir: Path) -> tuple[str, float] | None:
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, cfg.champion_alias)
    except MlflowException:
        return None
    if champion.version == candidate_version:
        return None
    ours = read_json(Path(data_dir) / "stats.json")["prepared_sha256"]
    tag = champion.tags.get(f"eval.tuned.{cfg.metric}")
    if champion.tags.get("prepared_dataset_sha256") == ours and tag is not None:
        return champion.version, float(tag)
    return champion.version, _evaluate_champion(name, champion.version, cfg, data_dir)


def _evaluate_champion(name: str, version: str, cfg: GateSection, data_dir: Path) -> float:
    import tempfile

    import mlflow

    from components.inference import load_model, load_tokenizer

    from components.scoring import evaluate_model

    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tempfile.mkdtemp())
    labels_file = Path(data_dir) / "labels.json"
    labels = read_json(labels_file) if labels_file.exists() else None
    metrics, _ = evaluate_model(load_model(local), load_tokenizer(local), read_jsonl(Path(data_dir) / "eval.jsonl"),
                                EvalSection(), labels, f"champion v{version}")
    return metrics[cfg.metric]


def run(cfg: GateSection, registration: dict, eval_report: dict, data_dir: Path) -> dict:
    from mlflow import MlflowClient

    heading("gate")
    configure_retries()  # every call below is idempotent (reads, tag and alias sets), so retrying is safe
    client = MlflowClient()
    name, version = registration["name"], str(registration["version"])
    champ = champion_score(client, name, cfg, version, data_dir)
    verdict = decide(cfg, eval_report["tuned"][cfg.metric], eval_report["base"][cfg.metric], champ and champ[1])
    verdict["champion_version"] = champ and champ[0]
    tags = {"gate.verdict": "passed" if verdict["passed"] else "failed", "gate.reason": verdict["reason"],
            "gate.metric": cfg.metric, "gate.gain_over_base": f"{verdict['gain_over_base']:.4f}",
            "gate.gain_over_champion": "n/a" if champ is None else f"{verdict['gain_over_champion']:.4f}",
            "gate.champion_version": str(verdict["champion_version"] or "none")}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    console.print(f"gate {tags['gate.verdict']}: {verdict['reason']}")
    return verdict


def set_alias(name: str, version: str, alias: str) -> None:
    from mlflow import MlflowClient

    configure_retries()
    MlflowClient().set_registered_model_alias(name, alias, str(version))
    console.print(f"{name}@{alias} -> version {version}")
