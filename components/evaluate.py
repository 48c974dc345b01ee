"""Evaluation: batched greedy generation (left padding) and response perplexity, base vs tuned.

The same functions score the merged model (merge parity) and the quantized variants (quantize).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from components.config import EvalSection
from components.prepare_data import read_jsonl
from components.util import record_config, console, heading, quiet_libraries, read_json, write_json

INVALID = "<invalid>"


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip()).strip(" .").casefold()


def load_tokenizer(model_dir: Path, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = padding_side  # left for batched generation: new tokens follow the real text
    return tok


def load_model(model_dir: Path, dtype: str = "bfloat16", adapter_dir: Path | None = None, quantization=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), quantization_config=quantization)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, label: str = "generate") -> list[str]:
    """Greedy outputs in the order of prompts; batches are formed from similar lengths to limit padding."""
    import torch
    from rich.progress import Progress

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: dict[int, str] = {}
    with Progress(console=console, transient=True) as bar, torch.inference_mode():
        task = bar.add_task(label, total=len(prompts))
        for idx in _batches(order, batch_size):
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            outputs.update(zip(idx, texts))
            bar.advance(task, len(idx))
    return [outputs[i].strip() for i in range(len(prompts))]


def response_nll(model, tok, examples: list[dict], batch_size: int) -> tuple[float, int]:
    """Summed negative log-likelihood of the responses given the prompts, and the token count."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in _batches(examples, batch_size):
            p = tok([e["prompt"] for e in batch], add_special_tokens=False)["input_ids"]
            c = tok([e["completion"] for e in batch], add_special_tokens=False)["input_ids"]
            width = max(len(a) + len(b) for a, b in zip(p, c))
            ids = torch.full((len(batch), width), tok.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (a, b) in enumerate(zip(p, c)):  # right padding: positions start at 0 for every row
                ids[row, : len(a) + len(b)] = torch.tensor(a + b)
                labels[row, len(a): len(a) + len(b)] = torch.tensor(b)
                mask[row, : len(a) + len(b)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            total += float(nll)
            count += int((target != -100).sum())
    return total, count


def score(predictions: list[str], answers: list[str], labels: list[str] | None) -> dict:
    exact = [normalize(p) == normalize(a) for p, a in zip(predictions, answers)]
    result = {"exact_match": sum(exact) / max(len(exact), 1), "n": len(exact)}
    if labels:
        from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

        by_norm = {normalize(lab): lab for lab in labels}
        pred = [by_norm.get(normalize(p), INVALID) for p in predictions]
        cats = list(labels) + [INVALID]
        prec, rec, f1, support = precision_recall_fscore_support(answers, pred, labels=list(labels), zero_division=0)
        result["per_class"] = {lab: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                               for lab, p, r, f, s in zip(labels, prec, rec, f1, support)}
        result["macro_f1"] = float(sum(f1) / len(f1))
        result["invalid_rate"] = pred.count(INVALID) / max(len(pred), 1)
        result["confusion"] = {"categories": cats, "matrix": confusion_matrix(answers, pred, labels=cats).tolist()}
    return result


def constrained_metrics(model, tok, examples: list[dict], free: list[str], labels: list[str], batch_size: int) -> dict:
    """Accuracy when decoding may only produce a label, next to free generation's exact match."""
    from components import labels as label_scoring

    answers = [e["answer"] for e in examples]
    constrained = label_scoring.predict(model, tok, [e["prompt"] for e in examples], labels, batch_size)
    by_norm = {normalize(lab): lab for lab in labels}
    valid = [(by_norm[normalize(f)], c) for f, c in zip(free, constrained) if normalize(f) in by_norm]
    return {"label_accuracy": label_scoring.accuracy(constrained, answers),
            "agreement_where_valid": sum(f == c for f, c in valid) / len(valid) if valid else None,
            "constrained_predictions": constrained}


def evaluate_model(model, tok, examples: list[dict], cfg: EvalSection, labels: list[str] | None, name: str) -> tuple[dict, list[str]]:
    """(metrics, free predictions); label tasks also get label_accuracy from constrained decoding."""
    metrics, preds = evaluate_in_detail(model, tok, examples, cfg, labels, name)
    metrics.pop("constrained_predictions", None)
    return metrics, preds


def evaluate_in_detail(model, tok, examples: list[dict], cfg: EvalSection, labels: list[str] | None, name: str) -> tuple[dict, list[str]]:
    max_new = cfg.max_new_tokens
    if labels:  # a label is all we want back: stop paying for tokens past the longest one
        max_new = min(max_new, max(len(tok(lab, add_special_tokens=False)["input_ids"]) for lab in labels) + 2)
    preds = generate(model, tok, [e["prompt"] for e in examples], max_new, cfg.batch_size, label=f"eval {name}")
    answers = [e["answer"] for e in examples]
    metrics = score(preds, answers, labels)
    if labels:
        metrics.update(constrained_metrics(model, tok, examples, preds, labels, cfg.batch_size))
    nll, count = response_nll(model, tok, examples, cfg.batch_size)
    metrics["loss"] = nll / max(count, 1)
    metrics["perplexity"] = math.exp(min(metrics["loss"], 50))
    return metrics, preds


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
