"""The promotion gate: compare what will serve with the base model and the current champion.

Run as: a task of `llmops run`, after register (it reads the registered version and the champion in MLflow).

The candidate's figure is the served model's: the merge under the recommended `--quantize` flag, as the
quantize stage measured it (the version's `eval.tuned.*`). The base is taken on the same eval rows. The
champion, also as served, is measured on the candidate's rows unless both were scored on the same ones.
Either way the verdict and the deltas become version tags; a candidate that passes gets the
`challenger` alias (in the pipeline's dsl.If branch), one that fails stays registered without an alias.
"""

from __future__ import annotations

from pathlib import Path

from components.artifacts import EvalReport, PreparedData
from components.config import EvalSection, GateSection
from components.registry_tags import (
    GATE_CHAMPION_VERSION,
    GATE_GAIN_OVER_BASE,
    GATE_GAIN_OVER_CHAMPION,
    GATE_METRIC,
    GATE_REASON,
    GATE_VERDICT,
    QUANTIZE_TAG,
    Verdict,
    eval_tag,
    production_of,
)
from components.tracking import configure_retries
from components.util import console, heading

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
    return {
        "passed": not reasons,
        "metric": cfg.metric,
        "candidate": candidate,
        "base": base,
        "champion": champion,
        "gain_over_base": over_base,
        "gain_over_champion": over_champion,
        "reason": "; ".join(reasons) or "beats the base" + (" and the champion" if champion is not None else ""),
    }


def champion_score(
    client, name: str, cfg: GateSection, candidate_version: str, data_dir: Path, rows: int
) -> tuple[str, float] | None:
    """The production champion's version and score; None without one, or when it is this very candidate. The
    champion lives in the production model (`name` without its candidates suffix), where promotion copied it."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(production_of(name) or name, cfg.champion_alias)
    except MlflowException:  # no production model yet, or no champion in it
        return None
    if champion.source == f"models:/{name}/{candidate_version}" or (
        production_of(name) is None and champion.version == candidate_version
    ):
        return None
    ours = PreparedData(data_dir).stats().prepared_sha256
    tag = champion.tags.get(eval_tag("tuned", cfg.metric))
    same_rows = champion.tags.get(eval_tag("tuned", "examples")) == str(rows)
    if champion.tags.get("prepared_dataset_sha256") == ours and same_rows and tag is not None:
        return champion.version, float(tag)
    return champion.version, _evaluate_champion(champion, cfg, data_dir, rows)


def _evaluate_champion(champion, cfg: GateSection, data_dir: Path, rows: int) -> float:
    """The champion as it serves (its recommended --quantize flag), on the candidate's eval rows."""
    import tempfile

    from components.chat_pyfunc import download_version, verify_version
    from components.inference import bounded_int8_kernels, load_as_served, load_tokenizer
    from components.scoring import score_model

    # Checked against the champion's manifest like anything that serves: the gate runs the files it scores.
    local = download_version(champion, Path(tempfile.mkdtemp()))
    model_dir, _ = verify_version(local, champion)
    data = PreparedData(data_dir)
    # The champion may have another tokenizer (another base): it reads the strings, never this run's token ids.
    rows_as_text = [{k: v for k, v in e.items() if not k.endswith("_ids")} for e in data.examples("eval")[:rows]]
    with bounded_int8_kernels():  # it may serve in int8
        model = load_as_served(model_dir, champion.tags.get(QUANTIZE_TAG, "none"))
        scored = score_model(
            model,
            load_tokenizer(model_dir),
            rows_as_text,
            EvalSection(),
            data.labels(),
            f"champion v{champion.version}",
        )
    return scored.metrics[cfg.metric]


def base_on_served_rows(metric: str, registration: dict, report_dir: Path) -> float | None:
    """The base model's figure on the rows the served model was scored on (None when it cannot be had)."""
    rows, scored = int(registration[eval_tag("tuned", "examples")]), int(registration[eval_tag("base", "examples")])
    if rows == scored:
        return getattr(EvalReport(report_dir).report().base, metric)
    if metric not in ("exact_match", "label_accuracy"):
        return None  # a loss is not kept per row
    from components.inference import normalize

    samples = EvalReport(report_dir).predictions()[:rows]
    key = "base_constrained" if metric == "label_accuracy" else "base"
    return sum(normalize(s[key] or "") == normalize(s["answer"]) for s in samples) / max(len(samples), 1)


def run(cfg: GateSection, registration: dict, report_dir: Path, data_dir: Path) -> dict:
    from mlflow import MlflowClient

    heading("gate")
    configure_retries()  # every call below is idempotent (reads, tag and alias sets), so retrying is safe
    client = MlflowClient()
    name, version = registration["name"], str(registration["version"])
    rows = int(registration[eval_tag("tuned", "examples")])
    base = base_on_served_rows(cfg.metric, registration, report_dir)
    if base is None:
        verdict = {
            "passed": False,
            "gain_over_base": float("nan"),
            "gain_over_champion": None,
            "champion_version": None,
            "reason": f"quantize scored {rows} eval rows and evaluate {registration[eval_tag('base', 'examples')]}: "
            f"{cfg.metric} of the base on the served rows is unknown; set quantize.eval_examples=null",
        }
        champ = None
    else:
        champ = champion_score(client, name, cfg, version, data_dir, rows)
        verdict = decide(cfg, registration[eval_tag("tuned", cfg.metric)], base, champ and champ[1])
        verdict["champion_version"] = champ and champ[0]
    tags = {
        GATE_VERDICT: Verdict.PASSED if verdict["passed"] else Verdict.FAILED,
        GATE_REASON: verdict["reason"],
        GATE_METRIC: cfg.metric,
        GATE_GAIN_OVER_BASE: f"{verdict['gain_over_base']:.4f}",
        GATE_GAIN_OVER_CHAMPION: "n/a" if champ is None else f"{verdict['gain_over_champion']:.4f}",
        GATE_CHAMPION_VERSION: str(verdict["champion_version"] or "none"),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if adapter := registration.get("adapter"):
        # The adapter on its base is what the merge reproduces (the merge stage's parity check): one verdict.
        same = {**tags, GATE_REASON: f"as version {version} of {name}, its merge: {verdict['reason']}"}
        for key, value in same.items():
            client.set_model_version_tag(adapter[0], adapter[1], key, value)
    console.print(f"gate {tags[GATE_VERDICT]}: {verdict['reason']}")
    return verdict


def set_alias(name: str, version: str, alias: str) -> None:
    from mlflow import MlflowClient

    configure_retries()
    MlflowClient().set_registered_model_alias(name, alias, str(version))
    console.print(f"{name}@{alias} -> version {version}")
