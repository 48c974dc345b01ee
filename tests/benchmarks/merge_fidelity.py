"""Benchmark: which merge reproduces the trained model (QLoRA adapter on BANKING77, SmolLM2).

A QLoRA adapter is trained on BANKING77 with the `banking77` profile's settings for a fixed number of steps
(LLMOPS_MERGE_STEPS, default 300: the benchmark is about the merge, not the best adapter), then every
condition below answers the same held-out rows of the eval split, which training never saw, with decoding
constrained to the labels:

- trained: the NF4 base + adapter, the model training computed;
- the adapter on the 16-bit base (what evaluate scored before);
- the merge into the 16-bit base, and the merge into the dequantized NF4 base, each stored as float16;
- each merge loaded the way TGI loads it under `--quantize bitsandbytes` (int8) and `bitsandbytes-nf4`.

Agreement is the share of rows where a condition picks the same label as the trained model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from tests.benchmarks import evaluation

STEPS = int(os.environ.get("LLMOPS_MERGE_STEPS", "300"))
HELD_OUT = int(os.environ.get("LLMOPS_MERGE_ROWS", "300"))


def trained_adapter(work: Path) -> tuple[Path, Path]:
    from components import prepare_data, train
    from pipelines.config import load_config

    cfg = load_config(
        "banking77",
        [
            f"data.path={evaluation.BANKING77}",
            f"train.checkpoint_root={work / 'ck'}",
            f"train.max_steps={STEPS}",
            "train.eval_every=0",
            "train.target_accuracy=null",
            "train.max_minutes=null",
        ],
    )
    with evaluation.no_tracking():
        prepare_data.run(cfg.data, evaluation.base_dir(), work / "data")
        train.run(cfg.train, evaluation.base_dir(), work / "data", work / "adapter")
    return work / "data", work / "adapter"


def conditions(base: Path, adapter: Path, work: Path) -> dict:
    """Name -> a function that loads that model."""
    from components import merge
    from components.inference import bnb_config, load_model

    for kind in ("16bit", "dequantized-nf4"):
        merge.merge_adapter(base, adapter, work / kind, "float16", base=kind)
    found = {
        "trained: NF4 base + adapter": lambda: merge.trained_condition(base, adapter, "float32"),
        "adapter on the 16-bit base": lambda: load_model(base, "float32", adapter_dir=adapter),
    }
    for kind, title in (
        ("16bit", "merge into the 16-bit base"),
        ("dequantized-nf4", "merge into the dequantized NF4 base"),
    ):
        found[f"{title} (float16)"] = lambda d=work / kind: load_model(d, "float32")
        for variant, flag in (("int8", "bitsandbytes"), ("nf4", "bitsandbytes-nf4")):
            found[f"{title}, --quantize {flag}"] = lambda d=work / kind, v=variant: load_model(
                d, quantization=bnb_config(v)
            )
    return found


def measure() -> dict:
    import gc

    from components.artifacts import PreparedData
    from components.inference import LabelTrie, load_tokenizer, predict_labels
    from components.scoring import accuracy

    evaluation.pin_threads()
    work = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        started = time.perf_counter()
        data_dir, adapter = trained_adapter(work)
        train_minutes = (time.perf_counter() - started) / 60
        data = PreparedData(data_dir)
        rows = data.examples("eval")[:HELD_OUT]
        prompts, answers = [e["prompt"] for e in rows], [e["answer"] for e in rows]
        tok = load_tokenizer(evaluation.base_dir())
        trie = LabelTrie(tok, data.labels())
        results, reference = {}, None
        for name, load in conditions(evaluation.base_dir(), adapter, work).items():
            model = load()
            predicted = predict_labels(model, tok, prompts, trie, 32, progress=name)
            reference = reference or predicted  # the trained condition comes first
            results[name] = {
                "accuracy": accuracy(predicted, answers),
                "agreement": sum(p == r for p, r in zip(predicted, reference)) / len(rows),
            }
            del model
            gc.collect()
        return {"results": results, "rows": len(rows), "steps": STEPS, "train_minutes": train_minutes}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    trained = result["results"]["trained: NF4 base + adapter"]["accuracy"]
    out = [
        (
            "setup",
            f"SmolLM2-135M, QLoRA adapter after {result['steps']} steps of the banking77 profile "
            f"({result['train_minutes']:.0f} min); {result['rows']} held-out eval rows, labels by constrained "
            "greedy decoding",
            "",
            "",
        )
    ]
    for name, r in result["results"].items():
        out.append(
            (
                f"{name}: label accuracy / agreement with the trained model",
                f"{r['accuracy']:.3f} / {r['agreement']:.3f}",
                "≤ 1 pt below trained" if "merge" in name else "",
                f"{(r['accuracy'] - trained) * 100:+.1f} pt",
            )
        )
    return out
