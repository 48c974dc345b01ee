"""Benchmark: which merge reproduces the trained model (QLoRA adapter on BANKING77, SmolLM2).

A QLoRA adapter is trained on BANKING77 with the `banking77` profile's settings for a fixed number of steps
(LLMOPS_MERGE_STEPS, default 300: the benchmark is about the merge, not the best adapter), then every
condition below answers the same held-out rows of the eval split, which training never saw, with decoding
constrained to the labels:

- trained: the NF4 base + adapter, the model training computed;
- the adapter on the 16-bit base (what evaluate scored before);
- the merge into the 16-bit base, and the merge into the dequantized NF4 base, each stored as float16;
- each merge loaded the way TGI loads it under `--quantize bitsandbytes` (int8) and `bitsandbytes-nf4`.

Agreement is the share of rows where a condition picks the same label as the trained model. With
LLMOPS_MERGE_FROM=dir (a directory holding `data/` and `adapter/`, as the time-to-quality benchmark leaves
in the benchmark work directory) the adapter that benchmark trained is measured instead of a new one.

The prompt contract is checked on the same rows: each row's bare user message, rendered through the
merged model's own chat template (no system prompt, no prefix), must give the token ids training saw.
Identical ids mean identical answers, so accuracy on a bare message equals accuracy with the system prompt.
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
    from components.stages import prepare_data, train

    if os.environ.get("LLMOPS_MERGE_FROM"):
        reused = Path(os.environ["LLMOPS_MERGE_FROM"])
        return reused / "data", reused / "adapter"
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


def conditions(base: Path, adapter: Path, work: Path, contract: dict | None) -> dict:
    """Name -> a function that loads that model."""
    from components.inference import bnb_config, load_model
    from components.stages import merge

    for kind in ("16bit", "dequantized-nf4"):
        merge.merge_adapter(base, adapter, work / kind, "float16", contract=contract, base=kind)
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


def bare_messages_as_trained(merged: Path, rows: list[dict]) -> int:
    """Rows whose bare user message renders, through the merged template, to the prompt training used."""
    from components.inference import load_tokenizer

    tok = load_tokenizer(merged)
    same = 0
    for row in rows:
        message = row["prompt"].split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
        )
        same += (
            tok(rendered, add_special_tokens=False)["input_ids"]
            == tok(row["prompt"], add_special_tokens=False)["input_ids"]
        )
    return same


def measure() -> dict:
    import gc

    from components.artifacts import PreparedData, TrainedAdapter
    from components.inference import LabelTrie, load_tokenizer, predict_labels
    from components.prompt_contract import read_contract
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
        for name, load in conditions(evaluation.base_dir(), adapter, work, read_contract(data_dir)).items():
            model = load()
            predicted = predict_labels(model, tok, prompts, trie, 32, progress=name)
            reference = reference or predicted  # the trained condition comes first
            results[name] = {
                "accuracy": accuracy(predicted, answers),
                "agreement": sum(p == r for p, r in zip(predicted, reference)) / len(rows),
            }
            del model
            gc.collect()
        trained = TrainedAdapter(adapter)
        steps = trained.metrics().steps if trained.metrics_file.exists() else STEPS
        if os.environ.get("LLMOPS_MERGE_FROM") and trained.metrics_file.exists():
            train_minutes = trained.metrics().stage_seconds / 60  # the reused run's own training time
        bare = bare_messages_as_trained(work / "dequantized-nf4", rows)
        return {
            "results": results,
            "rows": len(rows),
            "steps": steps,
            "train_minutes": train_minutes,
            "bare_same": bare,
        }
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
    if "bare_same" in result:
        out.append(
            (
                "bare user message through the merged chat template: rows rendered to the trained prompt's token ids",
                f"{result['bare_same']} / {result['rows']}",
                "all",
                "accuracy identical" if result["bare_same"] == result["rows"] else "-",
            )
        )
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
