"""The evaluate stage: the base and the tuned model scored on the eval split, side by side.

Run as: `llmops stage evaluate [eval.key=value]` (alone, on a local run's base, adapter and data), or a task of
`llmops run`.

Scoring itself lives in components.scoring (quantize and the gate use it too); this module runs it
for both models, writes the report, predictions and confusion matrix, and logs them to MLflow.
"""

from __future__ import annotations

from pathlib import Path

from components import reports
from components.artifacts import EvalReport, PreparedData, record_config
from components.config import EvalSection
from components.inference import load_model, load_tokenizer
from components.scoring import score_model
from components.util import console, heading, quiet_libraries, write_json


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


def fitted_eval(cfg: EvalSection, base_dir: Path, adapter_dir: Path, examples: list[dict]) -> EvalSection:
    """The base form and eval batch the memory plan fits on this device (the configured ones when they fit):
    base_form auto scores on the 16-bit base where one batch of it fits, else on the NF4 base."""
    import torch

    from components import memory_plan
    from components.compute import device_memory, fit_here

    shape, lora = memory_plan.model_shape(base_dir), memory_plan.adapter_params(adapter_dir)
    tokens, gpu = memory_plan.longest_row(examples), torch.cuda.is_available()
    if cfg.base_form == "auto":
        sixteen = cfg.model_copy(update={"base_form": "16bit"})
        fits = memory_plan.eval_plan(shape, sixteen, tokens, lora, 1, gpu).total <= device_memory(gpu)
        cfg = sixteen if fits else cfg.model_copy(update={"base_form": "nf4"})
    plan_for = lambda b: memory_plan.eval_plan(shape, cfg, tokens, lora, b, gpu)  # noqa: E731
    batch = fit_here(plan_for, cfg.batch_size, "eval.batch_size", gpu)
    return cfg.model_copy(update={"batch_size": batch})


def base_quantization(cfg: EvalSection, adapter_dir: Path):
    """None for the 16-bit base; for nf4, the 4-bit loading training used (its recorded double_quant)."""
    if cfg.base_form != "nf4":
        return None
    from components.artifacts import TrainedAdapter
    from components.inference import bnb_config

    trained = (TrainedAdapter(adapter_dir).stage_config() or {}).get("config", {})
    return bnb_config("nf4", compute_dtype=cfg.dtype, double_quant=trained.get("double_quant", True))


def run(cfg: EvalSection, base_dir: Path, adapter_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    from components.tracking import stage_run

    quiet_libraries()
    heading("evaluate")
    out_dir = Path(out_dir)
    record_config(out_dir, "evaluate", cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, out = PreparedData(data_dir), EvalReport(out_dir)
    examples, labels = data.examples("eval"), data.labels()
    tok = load_tokenizer(base_dir)
    cfg = fitted_eval(cfg, base_dir, adapter_dir, examples)  # before any weight is read
    with stage_run("evaluate", cfg.model_dump()) as tracker:
        model = load_model(
            base_dir, cfg.dtype, adapter_dir=adapter_dir, quantization=base_quantization(cfg, adapter_dir)
        )
        tuned_scored = score_model(model, tok, examples, cfg, labels, "tuned")
        with model.disable_adapter():  # the same weights without the adapter are the base model
            base_scored = score_model(model, tok, examples, cfg, labels, "base")
        base, tuned = base_scored.metrics, tuned_scored.metrics
        base_preds, tuned_preds = base_scored.predictions, tuned_scored.predictions
        constrained = {"base": base_scored.constrained, "tuned": tuned_scored.constrained}
        keys = ("exact_match", "loss", "perplexity") + (("label_accuracy",) if labels else ())
        typed = reports.Eval(
            base=base,
            tuned=tuned,
            labels=labels,
            delta={k: tuned[k] - base[k] for k in keys},
            base_form=cfg.base_form,  # which base both were scored on: 16bit, or nf4 (the trained condition)
        )
        typed.write(out.report_file)  # checked where it crosses to register and the gate
        report = typed.model_dump(exclude_none=True)
        samples = [
            {"id": e["id"], "answer": e["answer"], "base": b, "tuned": t}
            for e, b, t in zip(examples, base_preds, tuned_preds)
        ]
        for name, preds in constrained.items():
            for sample, pred in zip(samples, preds or []):
                sample[f"{name}_constrained"] = pred
        write_json(out.predictions_file, samples)
        if labels:
            tracker.log_artifact(plot_confusion(tuned["confusion"], out.confusion_plot_file, "tuned model"))
        for name, metrics in (("base", base), ("tuned", tuned)):
            tracker.log_metrics({f"eval.{name}.{k}": v for k, v in metrics.items() if not isinstance(v, dict)})
            tracker.log_metrics(
                {f"eval.{name}.f1.{label}": c["f1"] for label, c in metrics.get("per_class", {}).items()}
            )
        tracker.log_table(samples[: cfg.sample_predictions], EvalReport.SAMPLES)
        tracker.log_artifact(out.report_file)
    if labels:
        console.print(
            f"label accuracy (constrained): base {base['label_accuracy']:.3f} → tuned {tuned['label_accuracy']:.3f}; "
            f"invalid free answers {tuned['invalid_rate']:.1%}"
        )
    console.print(
        f"scored on the {cfg.base_form} base; exact match: base {base['exact_match']:.3f} → tuned "
        f"{tuned['exact_match']:.3f}; "
        f"perplexity {base['perplexity']:.2f} → {tuned['perplexity']:.2f}"
    )
    return report
