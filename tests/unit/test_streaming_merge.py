"""The streaming merge (components/streaming_merge.py) against the one-shot merge it replaces for big models."""

import json

import pytest
import torch
from safetensors.torch import load_file

from components.stages import merge
from components.streaming_merge import INDEX, stream_merge

pytestmark = pytest.mark.unit


def tensors(directory) -> dict:
    files = sorted(directory.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def sharded_base(tiny_base, tmp_path_factory):
    """The tiny base re-saved in shards of 40 kB: several shards, as a large model has."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded-base")
    AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).save_pretrained(out, max_shard_size="40KB")
    assert len(list(out.glob("*.safetensors"))) > 3 and (out / INDEX).exists()
    return out


@pytest.mark.parametrize("base", ["dequantized-nf4", "16bit"])
def test_the_streaming_merge_writes_the_one_shot_merges_tensors_bit_for_bit(
    tiny_base, sharded_base, tiny_adapter, tmp_path, base
):
    one_shot = merge.merge_adapter(tiny_base, tiny_adapter, tmp_path / "one-shot", "float16", base=base)
    streamed = stream_merge(
        sharded_base, tiny_adapter, tmp_path / "streamed", "float16", nf4=merge.merge_nf4(tiny_adapter, base)
    )
    expected, got = tensors(one_shot), tensors(streamed)
    assert set(got) == set(expected)
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert different == [], different[:5]
    assert all(t.dtype == torch.float16 for t in got.values() if t.is_floating_point())
    assert len(list(streamed.glob("*.safetensors"))) > 3  # written shard by shard
    assert json.loads((streamed / "config.json").read_text())["dtype"] == "float16"
    # and the adapter changed what it touched: the merge is not the base
    base_tensors = tensors(sharded_base)
    assert any(not torch.equal(base_tensors[k].to(torch.float16), got[k]) for k in got if "q_proj" in k)


def test_the_merge_stage_checks_parity_in_bfloat16_when_float32_does_not_fit(
    tiny_base, tiny_adapter, demo_prepared, tmp_path, monkeypatch
):
    """merge.compare_dtype auto: float32 when the float32 reference fits the memory at hand, else the trained
    condition in bfloat16 (the NF4 base for QLoRA), and the report says which."""
    from components import compute, memory_plan
    from components.config import MergeSection

    settings = MergeSection(parity_prompts=8, parity_threshold=0.0)
    roomy = merge.run(settings, tiny_base, tiny_adapter, demo_prepared, tmp_path / "roomy")
    params = memory_plan.model_shape(tiny_base).params
    # 3 bytes per parameter: the bfloat16 merge fits, a float32 reference does not
    monkeypatch.setattr(compute, "free_memory", lambda use_gpu: params * 3.0)
    tight = merge.run(settings, tiny_base, tiny_adapter, demo_prepared, tmp_path / "tight")
    assert (roomy["compare_dtype"], tight["compare_dtype"]) == ("float32", "bfloat16")
    assert tight["reference"] == "the trained model in bfloat16" and tight["parity"] >= 0.75
    # the weights written do not depend on how parity was checked
    assert all(
        torch.equal(a, b)
        for a, b in zip(tensors(tmp_path / "roomy" / "model").values(), tensors(tmp_path / "tight" / "model").values())
    )


def test_every_stage_fits_its_batch_to_the_memory_at_hand_or_refuses_before_loading(
    tiny_base, tiny_adapter, demo_prepared, tmp_path, monkeypatch
):
    """The plan is checked before any weight is read: a smaller batch where one fits, else a refusal that names
    the numbers and what to change."""
    from components import compute, memory_plan
    from components.config import EvalSection, MergeSection, TrainSection
    from components.jsonl import read_jsonl
    from components.stages import evaluate

    shape = memory_plan.model_shape(tiny_base)
    examples = read_jsonl(demo_prepared / "eval.jsonl")
    tokens = max(e["prompt_tokens"] + e["completion_tokens"] for e in examples)
    cfg = EvalSection(batch_size=32)
    at = lambda b: memory_plan.eval_plan(shape, cfg, tokens, 0, b, torch.cuda.is_available()).total  # noqa: E731
    monkeypatch.setattr(compute, "free_memory", lambda use_gpu: (at(8) + at(9)) / 2)
    assert evaluate.fitted_eval(cfg, tiny_base, tiny_adapter, examples).batch_size in (8, 9)

    train = TrainSection(batch_size=32, grad_accum=1, gradient_checkpointing=False, compute_dtype="float32")
    fits = lambda b: memory_plan.train_plan(shape, train, 64, 8, b).total  # noqa: E731
    monkeypatch.setattr(compute, "free_memory", lambda use_gpu: fits(4) + 1)
    fitted = compute.fitted_batch(train, shape, 64, 8)
    assert (fitted.batch_size, fitted.grad_accum) == (4, 8)  # the effective batch kept: 4 x 8 = 32

    monkeypatch.setattr(compute, "free_memory", lambda use_gpu: 1024.0)
    with pytest.raises(memory_plan.MemoryPlanError, match=r"evaluate: .* GB needed even at eval.batch_size=1"):
        evaluate.fitted_eval(cfg, tiny_base, tiny_adapter, examples)
    with pytest.raises(memory_plan.MemoryPlanError, match=r"train: .*train.batch_size=1.*data.max_tokens"):
        compute.fitted_batch(train, shape, 64, 8)
    with pytest.raises(memory_plan.MemoryPlanError, match="merge: .*placement.resources.merge.memory"):
        merge.run(MergeSection(), tiny_base, tiny_adapter, demo_prepared, tmp_path / "refused")
    assert not (tmp_path / "refused" / "model").exists() or not list((tmp_path / "refused" / "model").iterdir())


def test_the_nf4_hold_keeps_an_update_larger_than_nf4s_steps_and_loses_a_lora_sized_one():
    import torch

    from components.streaming_merge import Nf4Hold

    torch.manual_seed(0)
    weight = torch.randn(64, 256) * 0.02
    lost = {}
    for scale in (1e-4, 1.0):  # a LoRA-sized update, and one larger than the weight itself
        hold = Nf4Hold()
        hold.add(weight, torch.randn(64, 256) * 0.02 * scale, torch.float16)
        lost[scale] = hold.lost
    assert lost[1e-4] > 0.9 and lost[1.0] < 0.3, lost
    assert Nf4Hold().lost == 0.0  # no adapted weight: nothing to lose
