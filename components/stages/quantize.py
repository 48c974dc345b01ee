"""int8 (LLM.int8) and NF4 variants of the merged model: what quantization costs, and which
TGI `--quantize` flag to recommend.

Run as: `llmops stage quantize [quantize.key=value]` (alone, on a local run's merge and data), or a task of
`llmops run`.

TGI cannot load bitsandbytes checkpoints, so it is the merged 16-bit model that gets served, quantized by TGI at
load with the recommended flag.
"""

from __future__ import annotations

import gc
from pathlib import Path

from components import reports
from components.artifacts import MergedModel, PreparedData, QuantizeReport, record_config
from components.config import EvalSection, QuantizeSection
from components.inference import TGI_FLAG, VARIANT_OF_FLAG, bnb_config, bounded_int8_kernels, load_model, load_tokenizer
from components.registry_tags import QUANTIZE_TAG
from components.scoring import score_model
from components.util import console, dir_size, heading, quiet_libraries

SMALLEST_FIRST = ("nf4", "int8")


def deltas(reference: dict, candidate: dict) -> dict:
    # label tasks compare label accuracy: a free answer's formatting is not what quantization should be judged on
    metric = "label_accuracy" if "label_accuracy" in reference and "label_accuracy" in candidate else "exact_match"
    return {
        "accuracy_drop": reference[metric] - candidate[metric],
        "accuracy_metric": metric,
        "perplexity_increase": candidate["perplexity"] / reference["perplexity"] - 1.0,
    }


def nf4_adapter_lost(merged_dir: Path) -> float:
    """What the merge measured an NF4 copy of itself loses of the adapter (0 where it did not measure)."""
    merged = MergedModel(Path(merged_dir).parent)
    return merged.report().nf4_adapter_lost if merged.report_file.exists() else 0.0


def cannot_hold(lost: float, cfg: QuantizeSection) -> str:
    return (
        f"NF4 rounding of this merge loses {lost:.2f} of the adapter's update (merge report, nf4_adapter_lost), over "
        f"quantize.max_nf4_adapter_lost={cfg.max_nf4_adapter_lost}: the variant cannot hold the adapter; serve the "
        "adapter on the NF4 base instead (registry.adapters)"
    )


def recommend(results: dict, cfg: QuantizeSection) -> str:
    """The smallest variant within both thresholds; "none" serves the 16-bit model as is."""
    for variant in SMALLEST_FIRST:
        d = results.get(variant, {}).get("delta")
        if (
            d
            and d["accuracy_drop"] <= cfg.max_accuracy_drop
            and d["perplexity_increase"] <= cfg.max_perplexity_increase
        ):
            return TGI_FLAG[variant]
    return "none"


def scoring_settings(merged_dir: Path, examples: list[dict]) -> EvalSection:
    """Eval settings whose batch the memory plan fits on this device: one model at a time, the 16-bit the largest."""
    import torch

    from components import memory_plan
    from components.compute import fit_here

    cfg, shape, gpu = EvalSection(), memory_plan.model_shape(merged_dir), torch.cuda.is_available()
    tokens, gpus = memory_plan.longest_row(examples), max(1, torch.cuda.device_count())
    plan_for = lambda b: memory_plan.quantize_plan(  # noqa: E731
        shape, cfg.model_copy(update={"batch_size": b}), tokens, gpu, gpus
    )
    batch = fit_here(plan_for, cfg.batch_size, "eval.batch_size", gpu)
    return cfg.model_copy(update={"batch_size": batch})


def _measure(model, tok, examples, labels, name: str, scoring: EvalSection) -> dict:
    metrics = score_model(model, tok, examples, scoring, labels, name).metrics
    keep = {k: metrics[k] for k in ("exact_match", "perplexity", "loss", "label_accuracy") if k in metrics}
    keep["memory_bytes"] = model.get_memory_footprint()
    return keep


def run(cfg: QuantizeSection, merged_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    """The stage's entry point. The int8 pass needs oneDNN's kernel cache bounded from the process's first kernel."""
    with bounded_int8_kernels():
        return quantize(cfg, merged_dir, data_dir, out_dir)


def quantize(cfg: QuantizeSection, merged_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    from components.tracking import stage_run

    quiet_libraries()
    heading("quantize")
    out_dir = Path(out_dir)
    record_config(out_dir, "quantize", cfg)
    data = PreparedData(data_dir)
    examples, labels = data.examples("eval")[: cfg.eval_examples], data.labels()  # None: the whole eval split
    tok = load_tokenizer(merged_dir)
    scoring = scoring_settings(merged_dir, examples)  # before any weight is read
    with stage_run("quantize", cfg.model_dump()) as tracker:
        results = {"merged": _measure(load_model(merged_dir), tok, examples, labels, "merged", scoring)}
        results["merged"]["disk_bytes"] = dir_size(merged_dir)
        for variant in cfg.variants:
            if variant == "nf4" and (lost := nf4_adapter_lost(merged_dir)) > cfg.max_nf4_adapter_lost:
                results[variant] = {"not_scored": cannot_hold(lost, cfg), "adapter_lost": lost}
                continue
            model = load_model(merged_dir, quantization=bnb_config(variant))
            results[variant] = _measure(model, tok, examples, labels, variant, scoring)
            model.save_pretrained(out_dir / variant, safe_serialization=True)
            results[variant]["disk_bytes"] = dir_size(out_dir / variant)
            results[variant]["delta"] = deltas(results["merged"], results[variant])
            del model
            gc.collect()
        flag = recommend(results, cfg)
        # What will serve: the merge under the recommended flag. The gate and the version's headline judge it.
        served = {**results[VARIANT_OF_FLAG.get(flag, "merged")], "quantize": flag, "examples": len(examples)}
        typed = reports.Quantize.model_validate(
            {
                "results": results,
                QUANTIZE_TAG: flag,  # register copies it to the version tag of the same name
                "served": served,
                "examples": len(examples),
                "thresholds": {
                    "max_accuracy_drop": cfg.max_accuracy_drop,
                    "max_perplexity_increase": cfg.max_perplexity_increase,
                },
            }
        )
        typed.write(QuantizeReport(out_dir).report_file)  # checked where it crosses to register
        report = typed.model_dump(exclude_none=True)
        tracker.log_metrics(
            {
                f"quantize.{name}.{k}": v
                for name, r in results.items()
                for k, v in r.items()
                if isinstance(v, (int, float))
            }
        )
        tracker.set_tags({QUANTIZE_TAG: report[QUANTIZE_TAG]})
    for name, r in results.items():
        if "not_scored" in r:
            console.print(f"{name:>6}: not scored: {r['not_scored']}")
            continue
        console.print(
            f"{name:>6}: {r['disk_bytes'] / 1e6:7.1f} MB on disk, {r['memory_bytes'] / 1e6:7.1f} MB in memory, "
            f"exact match {r['exact_match']:.3f}, perplexity {r['perplexity']:.3f}"
        )
    console.print(f"recommended TGI --quantize: {report[QUANTIZE_TAG]}")
    return report
