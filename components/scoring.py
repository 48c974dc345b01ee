"""Scoring a model on prepared examples: exact match, per-class metrics, constrained label accuracy, perplexity.

The evaluate stage reports these for the base and the tuned model; quantize scores its variants and the
gate its champion with the same function, so every stage's numbers mean the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from components.config import EvalSection
from components.inference import LabelTrie, generate_with_ids, labels_after_free, normalize, response_nll
from components.literal_text import model_input

INVALID = "<invalid>"


def score(predictions: list[str], answers: list[str], labels: list[str] | None) -> dict:
    exact = [normalize(p) == normalize(a) for p, a in zip(predictions, answers)]
    result = {"exact_match": sum(exact) / max(len(exact), 1), "n": len(exact)}
    if labels:
        from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

        by_norm = {normalize(lab): lab for lab in labels}
        pred = [by_norm.get(normalize(p), INVALID) for p in predictions]
        cats = list(labels) + [INVALID]
        prec, rec, f1, support = precision_recall_fscore_support(answers, pred, labels=list(labels), zero_division=0)
        result["per_class"] = {
            lab: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for lab, p, r, f, s in zip(labels, prec, rec, f1, support)
        }
        result["macro_f1"] = float(sum(f1) / len(f1))
        result["invalid_rate"] = pred.count(INVALID) / max(len(pred), 1)
        result["confusion"] = {"categories": cats, "matrix": confusion_matrix(answers, pred, labels=cats).tolist()}
    return result


def accuracy(predictions: list[str], answers: list[str]) -> float:
    return sum(p == a for p, a in zip(predictions, answers)) / max(len(answers), 1)


def constrained_metrics(
    model,
    tok,
    prompts: list,
    answers: list[str],
    free_ids: list[list[int]],
    labels: list[str],
    batch_size: int,
    progress=None,
) -> dict:
    """Accuracy when decoding may only produce a label, next to free generation's exact match. Rows whose free
    answer already walked a label's token path keep it (the constrained choice is the same); the rest are decoded."""
    trie = LabelTrie(tok, labels)
    constrained, decoded = labels_after_free(model, tok, prompts, free_ids, trie, batch_size, progress)
    return {
        "label_accuracy": accuracy(constrained, answers),
        "constrained_decoded": decoded,
        "constrained": constrained,
    }


@dataclass
class Scored:
    """A model's metrics on some examples, with the predictions behind them."""

    metrics: dict
    predictions: list[str]  # free greedy generation
    constrained: list[str] | None  # label tasks: decoding constrained to the label set


def score_model(model, tok, examples: list[dict], cfg: EvalSection, labels: list[str] | None, name: str) -> Scored:
    """Exact match (and per-class metrics) of free generation; label tasks add constrained label accuracy;
    every task gets the response loss and perplexity."""
    max_new = cfg.max_new_tokens
    if labels:  # a label is all we want back: stop paying for tokens past the longest one
        max_new = min(max_new, max(len(tok(lab, add_special_tokens=False)["input_ids"]) for lab in labels) + 2)
    # progress lines: `eval tuned answers 64/300 prompts · ETA 00:00:12`, then its labels and its loss
    prompts, answers = [model_input(e) for e in examples], [e["answer"] for e in examples]
    preds, ids = generate_with_ids(model, tok, prompts, max_new, cfg.batch_size, f"eval {name} answers")
    metrics = score(preds, answers, labels)
    constrained = None
    if labels:
        extra = constrained_metrics(model, tok, prompts, answers, ids, labels, cfg.batch_size, f"eval {name} labels")
        constrained = extra.pop("constrained")
        metrics.update(extra)
    nll, count = response_nll(model, tok, examples, cfg.batch_size, f"eval {name} loss")
    metrics["loss"] = nll / max(count, 1)
    metrics["perplexity"] = math.exp(min(metrics["loss"], 50))
    return Scored(metrics, preds, constrained)
