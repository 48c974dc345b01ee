import json

import pytest
import torch

from components import inference, scoring
from components.config import EvalSection, MergeSection, QuantizeSection
from components.jsonl import read_jsonl
from components.literal_text import encoded
from components.stages import evaluate, merge, quantize

pytestmark = pytest.mark.unit


def test_score_counts_exact_matches_and_invalid_labels():
    labels = ["a", "b"]
    result = scoring.score(["a", " B.", "zzz", "a"], ["a", "b", "b", "b"], labels)
    assert result["exact_match"] == pytest.approx(0.5)
    assert result["invalid_rate"] == pytest.approx(0.25)
    assert result["confusion"]["categories"] == ["a", "b", "<invalid>"]
    assert result["confusion"]["matrix"] == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert result["per_class"]["a"]["precision"] == pytest.approx(0.5)
    assert result["per_class"]["b"]["recall"] == pytest.approx(1 / 3)


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_base, tiny_adapter, demo_prepared):
    tok = inference.load_tokenizer(tiny_base)
    model = inference.load_model(tiny_base, "float32", adapter_dir=tiny_adapter)
    prompts = [e["prompt"] for e in read_jsonl(demo_prepared / "eval.jsonl")][:8]
    prompts[0] = prompts[0].replace("Message:", "Message: a much longer message than the others, so padding matters:")
    batched = inference.generate(model, tok, prompts, 6, batch_size=8)
    single = [inference.generate(model, tok, [p], 6, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_response_nll_matches_per_example_loss(tiny_base, demo_prepared):
    tok = inference.load_tokenizer(tiny_base)
    model = inference.load_model(tiny_base, "float32")
    examples = read_jsonl(demo_prepared / "eval.jsonl")[:5]
    total, count = inference.response_nll(model, tok, examples, batch_size=5)
    manual_total, manual_count = 0.0, 0
    for ex in examples:
        # one unpadded row through the whole sequence's logits: the loss, written out
        prompt, answer = encoded(tok, [ex])
        ids = torch.tensor([prompt[0] + answer[0]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        at = range(len(prompt[0]) - 1, ids.shape[1] - 1)  # the logit before each answer token
        manual_total -= sum(float(logp[i, ids[0, i + 1]]) for i in at)
        manual_count += len(at)
        single, n = inference.response_nll(model, tok, [ex], batch_size=1)
        assert single == pytest.approx(-sum(float(logp[i, ids[0, i + 1]]) for i in at), rel=1e-4) and n == len(at)
    assert count == manual_count == sum(e["completion_tokens"] for e in examples)
    assert total == pytest.approx(manual_total, rel=1e-4)  # batched: padding and the logits window change nothing


def test_evaluate_stage_reports_base_and_tuned(tiny_base, tiny_adapter, demo_prepared, tmp_path):
    report = evaluate.run(EvalSection(batch_size=8), tiny_base, tiny_adapter, demo_prepared, tmp_path)
    assert report["tuned"]["loss"] < report["base"]["loss"]  # the adapter learned the answers
    assert report["tuned"]["n"] == report["base"]["n"] == len(read_jsonl(demo_prepared / "eval.jsonl"))
    assert (tmp_path / "confusion_tuned.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "predictions.json").read_text())) == report["tuned"]["n"]


def test_evaluation_falls_back_to_the_nf4_base_the_adapter_trained_on_where_16_bits_do_not_fit(
    tiny_base, tiny_adapter, demo_prepared, tmp_path, monkeypatch
):
    """eval.base_form auto on a device that holds one batch of the NF4 base but not of the 16-bit one: the stage
    scores the trained condition (the adapter on the NF4 base, as QLoRA trained it) and says so in its report."""
    from components import compute, memory_plan
    from components.artifacts import PreparedData

    shape, lora = memory_plan.model_shape(tiny_base), memory_plan.adapter_params(tiny_adapter)
    tokens = memory_plan.longest_row(PreparedData(demo_prepared).examples("eval"))

    def planned(form: str) -> float:
        section = EvalSection(batch_size=1, base_form=form)
        return memory_plan.eval_plan(shape, section, tokens, lora, 1, gpu=False).total

    assert planned("nf4") < planned("16bit")
    monkeypatch.setattr(compute, "free_memory", lambda gpu: (planned("nf4") + planned("16bit")) / 2)
    report = evaluate.run(EvalSection(batch_size=8), tiny_base, tiny_adapter, demo_prepared, tmp_path / "auto")
    assert report["base_form"] == "nf4" and report["tuned"]["loss"] < report["base"]["loss"]
    monkeypatch.undo()
    sixteen = evaluate.run(EvalSection(batch_size=1), tiny_base, tiny_adapter, demo_prepared, tmp_path / "16bit")
    assert sixteen["base_form"] == "16bit"
    assert report["base"]["loss"] != sixteen["base"]["loss"]  # another base was scored: the 4-bit rounding shows


@pytest.mark.parametrize("compare", ["auto", "layerwise"])
def test_merge_matches_adapter_on_base_and_is_servable(compare, tiny_base, tiny_adapter, demo_prepared, tmp_path):
    cfg = MergeSection(parity_prompts=16, compare_dtype=compare)
    report = merge.run(cfg, tiny_base, tiny_adapter, demo_prepared, tmp_path)
    assert report["parity"] >= 0.9 and report["compare_dtype"] == ("float32" if compare == "auto" else compare)
    served = tmp_path / "model"
    assert (served / "model.safetensors").exists() and (served / "config.json").exists()
    assert json.loads((served / "tokenizer_config.json").read_text())["chat_template"]
    assert json.loads((served / "config.json").read_text())["dtype"] == "float16"
    assert not (served / "adapter_config.json").exists()  # merged weights, not an adapter


@pytest.mark.parametrize("compare", ["auto", "layerwise"])
def test_merge_fails_below_the_parity_threshold(compare, tiny_base, tiny_adapter, demo_prepared, tmp_path, monkeypatch):
    # Simulate a lossy merge (the classic bug: merging into a 4-bit base) by corrupting the saved weights.
    real = merge.stream_merge

    def lossy(base_dir, adapter_dir, out_dir, dtype, nf4=None, hold=None):
        real(base_dir, adapter_dir, out_dir, dtype, nf4, hold)
        from safetensors.torch import load_file, save_file

        weights = load_file(out_dir / "model.safetensors")
        save_file(
            {k: torch.randn_like(v.float()).to(v.dtype) for k, v in weights.items()},
            out_dir / "model.safetensors",
            metadata={"format": "pt"},
        )

    monkeypatch.setattr(merge, "stream_merge", lossy)
    with pytest.raises(merge.ParityError, match="below merge.parity_threshold"):
        merge.run(
            MergeSection(parity_prompts=8, parity_threshold=0.9, compare_dtype=compare),
            tiny_base,
            tiny_adapter,
            demo_prepared,
            tmp_path,
        )


@pytest.mark.parametrize(
    "nf4, int8, expected",
    [
        ((0.0, 0.05), (0.0, 0.01), "bitsandbytes-nf4"),
        ((0.10, 0.05), (0.0, 0.01), "bitsandbytes"),
        ((0.0, 0.50), (0.01, 0.20), "none"),
    ],
)
def test_recommended_quantize_flag_follows_the_thresholds(nf4, int8, expected):
    results = {
        name: {"delta": {"accuracy_drop": d[0], "perplexity_increase": d[1]}}
        for name, d in (("nf4", nf4), ("int8", int8))
    }
    assert (
        quantize.recommend(results, QuantizeSection(max_accuracy_drop=0.02, max_perplexity_increase=0.10)) == expected
    )


def test_quantize_stage_measures_variants(tiny_base, demo_prepared, tmp_path):
    report = quantize.run(QuantizeSection(eval_examples=8), tiny_base, demo_prepared, tmp_path)
    merged, nf4, int8 = (report["results"][k] for k in ("merged", "nf4", "int8"))
    assert nf4["memory_bytes"] < merged["memory_bytes"] and int8["memory_bytes"] < merged["memory_bytes"]
    assert (tmp_path / "nf4" / "model.safetensors").exists() and (tmp_path / "int8" / "model.safetensors").exists()
    # The flag the report's own numbers imply: the smallest variant (nf4, then int8) whose accuracy drop and
    # perplexity rise against the merge are both within the configured thresholds; "none" when neither is.
    limits = QuantizeSection(eval_examples=8)
    assert report["thresholds"] == {
        "max_accuracy_drop": limits.max_accuracy_drop,
        "max_perplexity_increase": limits.max_perplexity_increase,
    }
    metric = "label_accuracy" if "label_accuracy" in merged else "exact_match"  # a label task judges labels
    within = {}
    for name, variant in (("nf4", nf4), ("int8", int8)):
        drop, rise = merged[metric] - variant[metric], variant["perplexity"] / merged["perplexity"] - 1.0
        assert variant["delta"]["accuracy_drop"] == pytest.approx(drop, abs=1e-12)
        within[name] = drop <= limits.max_accuracy_drop and rise <= limits.max_perplexity_increase
    expected = "bitsandbytes-nf4" if within["nf4"] else "bitsandbytes" if within["int8"] else "none"
    assert report["recommended_quantize"] == expected, (within, report["results"])
    served_as = {"bitsandbytes-nf4": nf4, "bitsandbytes": int8}.get(expected, merged)  # what the gate judges
    assert report["served"]["quantize"] == expected and report["served"]["perplexity"] == served_as["perplexity"]
    assert nf4["delta"]["perplexity_increase"] == pytest.approx(nf4["perplexity"] / merged["perplexity"] - 1)


def test_quantize_skips_the_nf4_variant_the_merge_measured_cannot_hold_the_adapter(
    tiny_base, tiny_adapter, demo_prepared, tmp_path
):
    """The tiny adapter was trained hard on tiny weights (NF4 keeps most of it: 0.20 lost, where the SmolLM2 demo
    adapter loses 1.08): scored at the default limit, skipped with the reason under a stricter one."""
    merged = tmp_path / "merged"
    merge.run(MergeSection(parity_prompts=4), tiny_base, tiny_adapter, demo_prepared, merged)
    lost = json.loads((merged / "merge_report.json").read_text())["nf4_adapter_lost"]
    assert 0 < lost <= QuantizeSection().max_nf4_adapter_lost

    scored = quantize.run(QuantizeSection(eval_examples=8), merged / "model", demo_prepared, tmp_path / "q")
    assert "delta" in scored["results"]["nf4"] and (tmp_path / "q" / "nf4").exists()
    strict = QuantizeSection(eval_examples=8, max_nf4_adapter_lost=lost / 2)
    report = quantize.run(strict, merged / "model", demo_prepared, tmp_path / "q2")
    nf4 = report["results"]["nf4"]
    assert "cannot hold the adapter" in nf4["not_scored"] and nf4["adapter_lost"] == lost
    assert not (tmp_path / "q2" / "nf4").exists() and "delta" in report["results"]["int8"]
    assert report["recommended_quantize"] != "bitsandbytes-nf4"
