"""The merge reproduces the model that was trained: a QLoRA adapter goes onto the NF4 weights it learned
against (dequantized), and the parity check compares the merge with that trained condition."""

import pytest
import torch

from components.config import MergeSection
from components.stages import merge

pytestmark = pytest.mark.unit


def logits(model, tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        return model(**enc).logits.float()


@pytest.fixture(scope="module")
def float32_adapter(tiny_base, demo_prepared, tmp_path_factory):
    """A QLoRA adapter whose training computed in float32, so its trained condition can be computed exactly so."""
    from components.config import TrainSection
    from components.stages import train

    out = tmp_path_factory.mktemp("float32-adapter")
    cfg = TrainSection(
        max_steps=12,
        batch_size=8,
        learning_rate=5e-3,
        lora_r=8,
        lora_alpha=16,
        warmup_ratio=0.0,
        compute_dtype="float32",
        checkpoint_root=str(out / "ck"),
    )
    train.run(cfg, tiny_base, demo_prepared, out / "adapter")
    return out / "adapter"


@pytest.fixture(scope="module")
def prompts(demo_prepared):
    from components.artifacts import PreparedData

    return [e["prompt"] for e in PreparedData(demo_prepared).examples("eval")][:8]


def test_merge_into_the_dequantized_base_reproduces_the_trained_logits(tiny_base, float32_adapter, prompts, tmp_path):
    from components.inference import load_model, load_tokenizer

    adapter = float32_adapter
    assert merge.trained_base(adapter) == {"double_quant": True, "dtype": "float32"}  # read from the train stage
    assert merge.merge_base(MergeSection(), adapter) == "dequantized-nf4"
    tok = load_tokenizer(tiny_base)
    trained = logits(merge.trained_condition(tiny_base, adapter), tok, prompts)
    scale = trained.abs().max().item()
    found = {}
    for base in ("dequantized-nf4", "16bit"):
        merge.merge_adapter(tiny_base, adapter, tmp_path / base, "float32", base=base)
        found[base] = (logits(load_model(tmp_path / base, "float32"), tok, prompts) - trained).abs().max().item()
    # Stated tolerance, 0.5% of the largest logit: bitsandbytes' CPU 4-bit matmul casts activations to
    # bfloat16 whatever the compute dtype (backends/cpu/ops.py), the merge computes in float32. Measured: 0.15%.
    assert found["dequantized-nf4"] < 5e-3 * scale, (found, scale)
    # The 16-bit base is another model: the NF4 rounding the adapter learned to correct is gone (measured: 35x).
    assert found["16bit"] > 10 * found["dequantized-nf4"], found


def test_the_merge_stage_judges_parity_against_the_adapter_on_the_dequantized_base(
    tiny_base, tiny_adapter, demo_prepared, tmp_path
):
    """(A merge whose saved weights lose the adapter fails this check: test_evaluate_merge.py.)"""
    cfg = MergeSection(parity_threshold=0.9, parity_prompts=16)
    report = merge.run(cfg, tiny_base, tiny_adapter, demo_prepared, tmp_path / "merged")
    assert report["reference"] == "dequantized NF4 base + adapter" and report["merged_into"] == "dequantized-nf4"
    assert report["parity"] >= 0.9 and report["prompts"] == 16
    assert merge.merge_base(cfg.model_copy(update={"base": "16bit"}), tiny_adapter) == "16bit"  # an override wins
