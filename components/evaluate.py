"""The evaluate stage: the base and the tuned model scored on the eval split, side by side.

Scoring itself lives in components.scoring (quantize and the gate use it too); this module runs it
for both models, writes the report, predictions and confusion matrix, and logs them to MLflow.
"""

from __future__ import annotations

from pathlib import Path

from components.config import EvalSection
from components.inference import load_model, load_tokenizer
from components.jsonl import read_jsonl
from components.scoring import evaluate_in_detail
from components.util import record_config, console, heading, quiet_libraries, read_json, write_json


def plot_confusion(confusion: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = confusion["categories"]
    size = max(5, 0.22 * len(cats) + 3)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion["matrix"], cmap="Blues")
    ax.set_xticks(range(len(cats)), cats, rotation=90, fontsize=7)
    ax.set_yticks(range(len(cats)), cats, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(cfg: EvalSection, base_dir: Path, adapter_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    from components.tracking import stage_run

    quiet_libraries()
    heading("evaluate")
    out_dir = Path(out_dir)
    record_config(out_dir, "evaluate", cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = read_jsonl(Path(data_dir) / "eval.jsonl")
    labels = read_json(Path(data_dir) / "labels.json") if (Path(data_dir) / "labels.json").exists() else None
    tok = load_tokenizer(base_dir)
    with stage_run("evaluate", cfg.model_dump()) as tracker:
        model = load_model(base_dir, cfg.dtype, adapter_dir=adapter_dir)
        tuned, tuned_preds = evaluate_in_detail(model, tok, examples, cfg, labels, "tuned")
        with model.disable_adapter():  # the same weights without the adapter are the base model
            base, base_preds = evaluate_in_detail(model, tok, examples, cfg, labels, "base")
        constrained = {name: m.pop("constrained_predictions", None) for name, m in (("base", base), ("tuned", tuned))}
        keys = ("exact_match", "loss", "perplexity") + (("label_accuracy",) if labels else ())
        report = {"base": base, "tuned": tuned, "labels": labels, "delta": {k: tuned[k] - base[k] for k in keys}}
        write_json(out_dir / "eval_report.json", report)
        samples = [{"id": e["id"], "answer": e["answer"], "base": b, "tuned": t} for e, b, t in zip(examples, base_preds, tuned_preds)]
        for name, preds in constrained.items():
            for sample, pred in zip(samples, preds or []):
                sample[f"{name}_constrained"] = pred
        write_json(out_dir / "predictions.json", samples)
        if labels:
            plot_confusion(tuned["confusion"], out_dir / "confusion_tuned.png", "tuned model")
            tracker.log_artifact(out_dir / "confusion_tuned.png")
        for name, metrics in (("base", base), ("tuned", tuned)):
            tracker.log_metrics({f"eval.{name}.{k}": v for k, v in metrics.items() if not isinstance(v, dict)})
            tracker.log_metrics({f"eval.{name}.f1.{label}": c["f1"] for label, c in metrics.get("per_class", {}).items()})
        tracker.log_table(samples[: cfg.sample_predictions], "sample_predictions.json")
        tracker.log_artifact(out_dir / "eval_report.json")
    if labels:
        console.print(f"label accuracy (constrained): base {base['label_accuracy']:.3f} → tuned {tuned['label_accuracy']:.3f}; "
                      f"invalid free answers {tuned['invalid_rate']:.1%}")
    console.print(f"exact match: base {base['exact_match']:.3f} → tuned {tuned['exact_match']:.3f}; "
                  f"perplexity {base['perplexity']:.2f} → {tuned['perplexity']:.2f}")
    return report
