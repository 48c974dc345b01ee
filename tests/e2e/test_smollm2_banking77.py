"""Slow tier: the real base model (SmolLM2-135M-Instruct from the packaged GGUF) on BANKING77."""

import csv
import json
import random
from pathlib import Path

import pytest

from components.config import load_config
from components.prepare_data import read_jsonl
from tests.conftest import shared_path

pytestmark = pytest.mark.e2e
INTENTS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "pin_blocked", "top_up_failed"]


@pytest.fixture(scope="module")
def banking_subset(tmp_path_factory):
    """A few intents of BANKING77, 48 messages each, so the prompt's label list stays short."""
    source = shared_path("data", "banking77", "train.csv")
    with open(source, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["category"] in INTENTS]
    random.Random(0).shuffle(rows)
    picked = [r for intent in INTENTS for r in [x for x in rows if x["category"] == intent][:48]]
    out = tmp_path_factory.mktemp("b77") / "banking77_subset.csv"
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(picked)
    return out


def test_tuned_smollm2_beats_base_and_registers_a_loadable_version(mlflow_server, banking_subset, llmops_cache, tmp_path):
    import mlflow
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    from pipelines.run import run_local

    cfg = load_config("local", [
        f"data.path={banking_subset}", f"data.labels=[{', '.join(INTENTS)}]", "data.max_eval_examples=40",
        "train.max_steps=30", "train.checkpoint_every=10", "quantize.eval_examples=16", "quantize.variants=[nf4]",
        "merge.parity_prompts=16", "registry.model_name=smollm2-banking77"])
    summary = run_local(cfg, tmp_path)
    assert summary["eval.tuned.exact_match"] > summary["eval.base.exact_match"] + 0.2, summary
    assert summary["eval.tuned.perplexity"] < summary["eval.base.perplexity"]

    version = MlflowClient().get_model_version("smollm2-banking77", summary["version"])
    assert version.tags["base_model"] == "packaged:smollm2-135m-instruct"
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/smollm2-banking77/{summary['version']}",
                                                dst_path=str(tmp_path / "download"))
    # The registry's own files reproduce what the pipeline measured on the merged model.
    from components.evaluate import evaluate_model, load_model, load_tokenizer
    from components.config import EvalSection

    quant = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=summary["run_id"], artifact_path="reports/quantize_report.json", dst_path=str(tmp_path / "r"))).read_text())
    examples = read_jsonl(sorted(tmp_path.glob("kfp/finetune-*/prepare-data/dataset"))[-1] / "eval.jsonl")[: quant["examples"]]
    tok = load_tokenizer(local)
    metrics, _ = evaluate_model(load_model(local), tok, examples, EvalSection(), INTENTS, "registered")
    assert metrics["exact_match"] == pytest.approx(quant["results"]["merged"]["exact_match"])
    # Decoding constrained to the label set agrees with every free answer that is a label, and can only
    # recover answers that free generation formatted wrongly.
    assert metrics["agreement_where_valid"] == 1.0 and metrics["label_accuracy"] >= metrics["exact_match"]
    assert json.loads((Path(local) / "labels.json").read_text()) == INTENTS  # serving knows the label set
    assert tok.pad_token_id != tok.eos_token_id
    assert AutoModelForCausalLM.from_pretrained(local).config.model_type == "llama"
