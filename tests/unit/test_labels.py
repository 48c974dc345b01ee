"""Label tasks: constrained decoding answers only with labels, agrees with valid free answers, and
validation during training stops at the target accuracy and keeps the best adapter."""

import json

import pytest
import torch
from safetensors.torch import load_file

from components import inference, scoring
from components.config import EvalSection
from components.jsonl import read_jsonl
from components.stages import train
from components.util import read_json
from tests.conftest import LABEL_TARGET, learner

pytestmark = pytest.mark.unit


def test_the_trie_admits_exactly_the_labels_followed_by_eos(tiny_base):
    tok = inference.load_tokenizer(tiny_base)
    names = ["card_lost", "card_arrival", "refund_request"]
    trie = inference.LabelTrie(tok, names)
    for name in names:
        ids = tok(name + tok.eos_token, add_special_tokens=False)["input_ids"]
        for i, token in enumerate(ids):
            assert token in trie.allowed(ids[:i])
        assert trie.label_of(ids + [tok.pad_token_id] * 2) == name
    assert trie.label_of(tok("card", add_special_tokens=False)["input_ids"]) is None  # a prefix is no label
    first = {tok(n, add_special_tokens=False)["input_ids"][0] for n in names}
    assert set(trie.allowed([])) == first


def test_an_untrained_model_constrained_to_labels_answers_only_labels(tiny_base, demo_prepared):
    tok = inference.load_tokenizer(tiny_base)
    model = inference.load_model(tiny_base, "float32")
    names = read_json(demo_prepared / "labels.json")
    prompts = [e["prompt"] for e in read_jsonl(demo_prepared / "eval.jsonl")][:12]
    free = inference.generate(model, tok, prompts, 8, batch_size=12)
    constrained = inference.predict_labels(model, tok, prompts, inference.LabelTrie(tok, names), batch_size=5)
    assert all(c in names for c in constrained)
    assert not all(f in names for f in free)  # free generation of random weights is mostly not a label


def test_constrained_scoring_of_a_trained_model(mapping_base, with_validation, early_stopped):
    _, _, out = early_stopped
    tok = inference.load_tokenizer(mapping_base)
    model = inference.load_model(mapping_base, "float32", adapter_dir=out / "adapter")
    examples, names = read_jsonl(with_validation / "eval.jsonl"), read_json(with_validation / "labels.json")
    scored = scoring.score_model(model, tok, examples, EvalSection(batch_size=8), names, "tuned")
    result, free, constrained = scored.metrics, scored.predictions, scored.constrained
    assert result["label_accuracy"] >= 0.8  # it picks the right label of the known mapping
    assert result["label_accuracy"] >= result["exact_match"]  # a badly formatted free answer cannot count
    # Greedy decoding that follows the free path while it spells a label must choose that same label.
    # (This small model often runs on past the label instead of stopping, so the free answers are
    # compared by the label they start with; the end-to-end test on SmolLM2 checks whole answers.)
    started = [
        (max((n for n in names if f.startswith(n)), key=len, default=None), c) for f, c in zip(free, constrained)
    ]
    spelled = [(n, c) for n, c in started if n is not None]
    assert len(spelled) >= 0.8 * len(free) and all(n == c for n, c in spelled)
    # Scoring decodes under the constraint only the rows whose free answer walked no label's path: a whole
    # constrained pass over every row chooses the same labels.
    from components.literal_text import model_input

    prompts, trie = [model_input(e) for e in examples], inference.LabelTrie(tok, names)
    assert constrained == inference.predict_labels(model, tok, prompts, trie, batch_size=8)


def test_only_rows_whose_free_answer_left_every_label_path_are_decoded_again(tiny_base, demo_prepared, monkeypatch):
    """A free answer that is a label's tokens and EOS is that label; one cut before its EOS, or off the trie, is
    decoded under the constraint, and only those rows are."""
    tok = inference.load_tokenizer(tiny_base)
    names = read_json(demo_prepared / "labels.json")
    trie = inference.LabelTrie(tok, names)
    path = lambda label: tok(label + tok.eos_token, add_special_tokens=False)["input_ids"]  # noqa: E731
    free_ids = [
        path(names[0]) + [tok.pad_token_id] * 2,  # the label, EOS, then the batch's padding
        path(names[1])[:-1],  # the label's tokens, cut before EOS
        tok("the weather is nice", add_special_tokens=False)["input_ids"],  # no label at all
        path(names[2]),
    ]
    asked = []

    def decode(model, tok_, prompts, trie_, batch_size, progress=None):
        asked.extend(prompts)
        return [names[3]] * len(prompts)

    monkeypatch.setattr(inference, "predict_labels", decode)
    prompts = ["p0", "p1", "p2", "p3"]
    labels, decoded = inference.labels_after_free(None, tok, prompts, free_ids, trie, batch_size=4)
    assert labels == [names[0], names[3], names[3], names[2]] and decoded == 2 and asked == ["p1", "p2"]


def test_validation_stops_at_the_target_and_keeps_the_best_adapter(early_stopped):
    cfg, metrics, out = early_stopped
    curve = json.loads((out / "adapter" / "validation_curve.json").read_text())
    assert curve[0]["step"] == 0 and curve[0]["accuracy"] < LABEL_TARGET  # the base model starts the curve
    assert curve[-1]["accuracy"] >= LABEL_TARGET > max(p["accuracy"] for p in curve[:-1])  # stopped at the first hit
    assert metrics["steps"] == curve[-1]["step"] < cfg.max_steps and metrics["steps"] % cfg.eval_every == 0
    assert metrics["val_best_accuracy"] == curve[-1]["accuracy"] and metrics["val_seconds_to_target"] > 0
    root = next((out / "ck").iterdir())
    record = json.loads((root / "validation.json").read_text())["best"]
    assert [p.name for p in root.glob("best-*")] == [record["dir"]] == [f"best-{metrics['steps']}"]  # older ones pruned
    best = load_file(root / record["dir"] / "adapter_model.safetensors")
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(best[k], final[k]) for k in best)
    assert (out / "adapter" / "accuracy_over_time.png").stat().st_size > 1000


def test_the_output_is_the_adapter_of_the_best_validation(mapping_base, with_validation, tmp_path):
    """Without a target the run goes to max_steps; the adapter it hands on scores the best validation accuracy."""
    # a learning rate this high makes the accuracy swing between evaluations, so the best is rarely the last
    cfg = learner(tmp_path / "ck", max_steps=120, eval_every=20, learning_rate=3e-2)
    metrics = train.run(cfg, mapping_base, with_validation, tmp_path / "adapter")
    curve = json.loads((tmp_path / "adapter" / "validation_curve.json").read_text())
    best = max(curve, key=lambda p: p["accuracy"])
    assert metrics["steps"] == 120 and metrics["val_best_step"] == best["step"]
    tok = inference.load_tokenizer(mapping_base)
    model = inference.load_model(mapping_base, "float32", adapter_dir=tmp_path / "adapter")
    val = read_jsonl(with_validation / "val.jsonl")
    trie = inference.LabelTrie(tok, read_json(with_validation / "labels.json"))
    preds = inference.predict_labels(model, tok, [e["prompt"] for e in val], trie, 16)
    assert scoring.accuracy(preds, [e["answer"] for e in val]) == pytest.approx(best["accuracy"])
