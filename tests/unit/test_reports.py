"""The reports stages hand on (components/reports.py) are checked where they cross: a field renamed, missing or
mistyped on either side fails there, naming it, not later as a wrong registry tag."""

import pytest
from pydantic import ValidationError

from components import reports

pytestmark = pytest.mark.unit

MERGE = {
    "parity": 1.0,
    "compare_dtype": "float32",
    "reference": "dequantized NF4 base + adapter",
    "merged_into": "dequantized-nf4",
    "threshold": 0.9,
    "prompts": 32,
    "size_bytes": 272586419,
    "nf4_adapter_lost": 1.0757,
}
SCORES = {"exact_match": 0.94, "perplexity": 1.11, "loss": 0.1, "memory_bytes": 2, "disk_bytes": 3}


def test_a_merge_report_round_trips_and_refuses_what_its_readers_would_misread(tmp_path):
    path = tmp_path / "merge_report.json"
    reports.Merge(**MERGE).write(path)
    assert reports.Merge.read(path) == reports.Merge(**MERGE)
    for wrong, field in [
        ({**MERGE, "parity_share": 1.0}, "parity_share"),  # a renamed field
        ({k: v for k, v in MERGE.items() if k != "nf4_adapter_lost"}, "nf4_adapter_lost"),
        ({**MERGE, "compare_dtype": "fp32"}, "compare_dtype"),
        ({**MERGE, "parity": 1.5}, "parity"),
    ]:
        with pytest.raises(ValidationError, match=field):
            reports.Merge.model_validate(wrong)


def test_a_quantize_report_tells_a_scored_variant_from_one_that_could_not_hold_the_adapter():
    report = reports.Quantize.model_validate(
        {
            "results": {
                "merged": SCORES,
                "int8": {
                    **SCORES,
                    "delta": {"accuracy_drop": 0.03, "accuracy_metric": "exact_match", "perplexity_increase": 0.05},
                },
                "nf4": {"not_scored": "cannot hold the adapter", "adapter_lost": 1.08},
            },
            "recommended_quantize": "none",
            "served": {**SCORES, "quantize": "none", "examples": 36},
            "examples": 36,
            "thresholds": {"max_accuracy_drop": 0.01},
        }
    )
    assert isinstance(report.results["nf4"], reports.NotScored) and report.results["int8"].delta.accuracy_drop == 0.03
    with pytest.raises(ValidationError, match="perplexity"):
        reports.Quantize.model_validate(
            {**report.model_dump(), "served": {**SCORES, "perplexity": "high", "quantize": "none", "examples": 1}}
        )


def test_an_eval_report_holds_what_scoring_computes_and_refuses_a_misread(tmp_path):
    """The figures come from components.scoring.score itself (a label task: per-class scores, the confusion
    matrix), so a key scoring adds or renames fails here, not at register."""
    from components.scoring import score

    labels = ["card_arrival", "lost_card"]
    answers = ["card_arrival", "lost_card", "lost_card"]
    free = score(["card_arrival", "card_arrival", "weather"], answers, labels)
    scores = {**free, "label_accuracy": 2 / 3, "constrained_decoded": 1, "loss": 0.4, "perplexity": 1.49}
    report = reports.Eval(base=scores, tuned=scores, labels=labels, delta={"exact_match": 0.0}, base_form="nf4")
    path = tmp_path / "eval_report.json"
    report.write(path)
    read = reports.Eval.read(path)
    assert read == report and read.tuned.confusion.categories == [*labels, "<invalid>"]
    assert read.tuned.per_class["lost_card"].support == 2 and read.tuned.invalid_rate == pytest.approx(1 / 3)
    for wrong, field in [
        ({**report.model_dump(), "base_form": "4bit"}, "base_form"),
        ({**report.model_dump(), "tuned": {k: v for k, v in scores.items() if k != "n"}}, "n"),
        ({**report.model_dump(), "tuned": {**scores, "accuracy": 1.0}}, "accuracy"),
    ]:
        with pytest.raises(ValidationError, match=field):
            reports.Eval.model_validate(wrong)
