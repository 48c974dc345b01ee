"""The merge's parity check one decoder layer at a time (components/layer_parity.py): the streamed forward is the
model's own, the trained model it rebuilds is merge.adapter_on_base's, and it catches a merge without the adapter."""

import pytest
import torch

from components import layer_parity
from components.artifacts import PreparedData
from components.inference import load_tokenizer
from components.literal_text import encoded
from components.stages import merge
from components.streaming_merge import stream_merge, trained_base

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def setting(tiny_base, tiny_adapter, demo_prepared, tmp_path_factory):
    tok = load_tokenizer(tiny_base)
    examples = PreparedData(demo_prepared).examples("eval")[:12]
    nf4 = trained_base(tiny_adapter)
    merged = stream_merge(tiny_base, tiny_adapter, tmp_path_factory.mktemp("merged"), "float32", nf4)
    prompts, answers = encoded(tok, examples)
    batches = layer_parity.teacher_forced_batches(prompts, answers, tok.pad_token_id, 5)
    return tok, examples, nf4, merged, batches


def whole_model_logits(model, batches):
    with torch.no_grad():
        return [model(input_ids=ids).logits.float()[rows, cols] for ids, (rows, cols) in batches]


def test_the_streamed_forward_is_the_whole_models_and_the_reference_is_the_trained_one(
    setting, tiny_base, tiny_adapter
):
    from safetensors.torch import load_file

    tok, _, nf4, merged, batches = setting
    weights = load_file(merged / "model.safetensors")
    streamed = layer_parity.next_token_choices(merged, batches, weights.__getitem__)
    whole = whole_model_logits(merge.load_model(merged, "float32", device="cpu"), batches)
    assert max((s[1] - w).abs().max().item() for s, w in zip(streamed, whole)) < 1e-4

    rounded = merge.adapter_on_base(tiny_base, tiny_adapter, "dequantized-nf4")  # peft's adapter, unmerged
    _, report_logits = zip(*streamed)
    trained = whole_model_logits(rounded, batches)
    result = layer_parity.layerwise_parity(tiny_base, tiny_adapter, merged, setting[1], tok, nf4, 5)
    assert result["parity"] == 1.0 and result["max_logit_gap"] < 1e-4  # measured: 2.1e-7 (a float32 merge)
    assert max((r - t).abs().max().item() for r, t in zip(report_logits, trained)) < 1e-4


def test_a_merge_that_lost_the_adapter_is_caught(setting, tiny_base, tiny_adapter, tmp_path):
    tok, examples, nf4, _, _ = setting
    without = stream_merge(tiny_base, None, tmp_path / "base-only", "float32", nf4)
    result = layer_parity.layerwise_parity(tiny_base, tiny_adapter, without, examples, tok, nf4, 5)
    assert result["parity"] < 0.5 and result["max_logit_gap"] > 1.0  # measured: 0.0 of 12 prompts, a gap of 1.18


def test_auto_takes_the_first_check_that_fits_the_host(tiny_adapter, monkeypatch):
    """float32 where its reference fits, else bfloat16 where the merge loads whole, else layer by layer, else a
    refusal before any weight is read; for a 70B: layer by layer on a 128 GB host (as llmops plan says)."""
    from pathlib import Path

    from components import compute
    from components.config import MergeSection
    from components.memory_plan import GB, MemoryPlanError, adapter_params, layerwise_parity_bytes, model_shape

    llama_70b = Path(__file__).resolve().parents[1] / "fixtures" / "model_configs" / "llama-3.1-70b"
    shape = model_shape(llama_70b)
    one_layer = layerwise_parity_bytes(shape, adapter_params(tiny_adapter) * 4)
    for available, expected in [(400 * GB, "float32"), (200 * GB, "bfloat16"), (128 * GB, "layerwise")]:
        monkeypatch.setattr(compute, "free_memory", lambda use_gpu, a=available: a)
        assert merge.parity_dtype(MergeSection(), llama_70b, tiny_adapter) == expected
    monkeypatch.setattr(compute, "free_memory", lambda use_gpu: one_layer - 1)
    with pytest.raises(MemoryPlanError, match="even one layer at a time"):
        merge.parity_dtype(MergeSection(), llama_70b, tiny_adapter)
