"""The per-stage memory plan (components/memory_plan.py, `llmops plan`), on configs of sizes users will try.

Only config.json files ship (tests/fixtures/model_configs): the models are built on the meta device, so these
plans read no weight. The figures are computed, not measured; docs/BENCHMARKS.md compares them with measured
peaks on SmolLM2 (make bench ARGS=memory_plan), and the saved-tensor count is checked here against autograd.
"""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from components import memory_plan as mp
from pipelines.config import load_config
from pipelines.plan import plan

pytestmark = pytest.mark.unit
CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "model_configs"


def config(name: str) -> str:
    return str(CONFIGS / name / "config.json")


@pytest.mark.parametrize(
    "name, billions", [("llama-3.2-1b", 1.236), ("llama-3.1-8b", 8.030), ("llama-3.1-70b", 70.554)]
)
def test_the_meta_model_counts_the_published_parameters(name, billions):
    assert mp.model_shape(config(name)).params / 1e9 == pytest.approx(billions, rel=0.005)


@pytest.mark.parametrize("name, kib", [("llama-3.1-8b", 128), ("llama-3.1-70b", 320)])
def test_the_kv_cache_holds_the_published_bytes_per_token(name, kib):
    """8 KV heads of 128 in 32 (8B) or 80 (70B) layers, keys and values in 16 bits: 128 and 320 KiB a token."""
    shape = mp.model_shape(config(name))
    assert mp.kv_cache_bytes(shape, 1, 1) == kib * 1024
    assert mp.kv_cache_bytes(shape, 8, 512, width=4) == 8 * 512 * 2 * kib * 1024


def by_stage(verdicts) -> dict:
    return {v.plan.stage: v for v in verdicts}


def test_8b_qlora_trains_and_evaluates_on_one_24_gb_gpu_at_the_cluster_profile():
    cfg = load_config("cluster")
    stages = by_stage(plan(cfg, config("llama-3.1-8b"), "A10G", 32, answer_tokens=256))
    train, evaluate = stages["train"], stages["evaluate"]
    assert train.fits and train.plan.total <= 24e9
    # a smaller micro-batch when 16 does not fit, with the accumulation that keeps the effective batch (16 x 2)
    if "batch_size" in train.advice:
        batch = int(train.advice.split("train.batch_size=")[1].split()[0])
        accum = int(train.advice.split("train.grad_accum=")[1].split()[0])
        assert batch * accum >= cfg.train.batch_size * cfg.train.grad_accum
    assert evaluate.fits and evaluate.plan.total <= 24e9 and "eval.batch_size=" in evaluate.advice
    # the streaming merge fits a 32 GB node: float32 parity would not (32 GB), so it compares in bfloat16
    merge = stages["merge"]
    assert merge.fits and merge.plan.total <= 32e9 and "bfloat16" in merge.advice


def test_70b_qlora_fits_one_80_gb_gpu_and_16_bit_lora_is_refused_with_the_numbers():
    cfg = load_config("cluster", ["train.batch_size=1", "train.grad_accum=16"])
    qlora = by_stage(plan(cfg, config("llama-3.1-70b"), "H100", 512, answer_tokens=256))["train"]
    # the QLoRA paper fine-tuned 65B on one 48 GB GPU: the same order of magnitude
    assert qlora.fits and 35e9 < qlora.plan.total <= 80e9
    lora = load_config("cluster", ["train.method=lora", "train.quantization=none", "train.batch_size=1"])
    refused = by_stage(plan(lora, config("llama-3.1-70b"), "H100", 512, answer_tokens=256))["train"]
    assert not refused.fits
    assert (
        "refused:" in refused.advice and "base weights 141" in refused.advice and "train.method=qlora" in refused.advice
    )


def test_gradient_checkpointing_and_batch_size_move_the_plan_as_they_should():
    shape = mp.model_shape(config("llama-3.2-1b"))
    train = load_config("cluster").train
    off = mp.train_plan(shape, train.model_copy(update={"gradient_checkpointing": False}), 2048, 256, 8)
    on = mp.train_plan(shape, train.model_copy(update={"gradient_checkpointing": True}), 2048, 256, 8)
    half = mp.train_plan(shape, train.model_copy(update={"gradient_checkpointing": False}), 2048, 256, 4)
    assert on.items["activations"] < off.items["activations"] / 5
    assert half.items["activations"] == pytest.approx(off.items["activations"] / 2)
    assert on.items["base weights"] == off.items["base weights"]  # weights do not depend on the batch
    # a token budget of four rows of 2048: the batch of 8 runs in two parts, one part's activations at a time
    parts = mp.train_plan(
        shape, train.model_copy(update={"gradient_checkpointing": False, "micro_batch_tokens": 8192}), 2048, 256, 8
    )
    assert parts.items["activations"] == pytest.approx(half.items["activations"])
    assert parts.items["logits over the answers"] == pytest.approx(half.items["logits over the answers"])


def test_llmops_plan_prints_the_table_and_fails_when_a_stage_cannot_fit():
    from llmops.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["plan", "--model", config("llama-3.2-1b"), "--gpu", "A10G"], env={"COLUMNS": "200"})
    assert ok.exit_code == 0, ok.output
    assert "computed, not measured" in ok.output and "train" in ok.output and "merge" in ok.output
    too_big = runner.invoke(app, ["plan", "--model", config("llama-3.1-70b"), "--gpu", "24"], env={"COLUMNS": "200"})
    assert too_big.exit_code == 1 and "refused" in too_big.output
    unknown = runner.invoke(app, ["plan", "--model", config("llama-3.2-1b"), "--gpu", "TPU"])
    assert unknown.exit_code == 2 and "A10G" in unknown.output


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_the_saved_tensor_count_matches_what_autograd_keeps_in_each_decoder_layer(tiny_base, method):
    """One training forward of the tiny Llama through the train stage's own loading: every tensor autograd saves
    inside a decoder layer (new storage only, weights aside), against memory_plan.saved_per_token_layer."""
    import torch

    from components.config import TrainSection
    from components.stages import train

    quantization = "nf4" if method == "qlora" else "none"
    cfg = TrainSection(method=method, quantization=quantization, compute_dtype="bfloat16", gradient_checkpointing=False)
    model = train.load_model(cfg, tiny_base)
    model.train()
    layers = model.get_base_model().model.layers
    inside, seen, saved = [False], set(), [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        if inside[0] and not isinstance(tensor, torch.nn.Parameter) and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved[0] += storage.nbytes()
        return tensor

    for layer in layers:
        layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
        layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen |= params
    batch, tokens = 4, 48
    ids = torch.randint(3, 200, (batch, tokens), device=model.device)
    # under autocast, as the Trainer runs a bf16 step
    with (
        torch.autocast(model.device.type, dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().sum().backward()
    planned = len(layers) * batch * tokens * mp.saved_per_token_layer(mp.model_shape(tiny_base), cfg)
    assert 0.75 <= planned / saved[0] <= 1.25, (method, saved[0], planned)


def test_the_cluster_profile_compiles_with_settings_its_plan_fits(tmp_path):
    """The profile's own model (Llama 3.2 1B) on the smallest GPU the README names and its merge pod's memory:
    every stage fits as compiled (a stage that needs a smaller batch takes it itself), and the compiled pipeline
    carries the settings the plan judged."""
    import yaml

    from pipelines.finetune import compile_pipeline

    cfg = load_config("cluster")
    assert cfg.model.base_model == "meta-llama/Llama-3.2-1B-Instruct"
    host_gb = float(cfg.placement.resources["merge"]["memory"].removesuffix("Gi")) * 2**30 / 1e9
    verdicts = by_stage(plan(cfg, config("llama-3.2-1b"), "L4", host_gb, answer_tokens=256))
    assert all(v.fits for v in verdicts.values()), {s: v.advice for s, v in verdicts.items()}
    assert verdicts["train"].plan.total <= 24e9 and verdicts["merge"].plan.total <= host_gb * 1e9
    compiled = open(compile_pipeline(cfg, str(tmp_path / "finetune.yaml"))).read()
    params = next(yaml.safe_load_all(compiled))["root"]["inputDefinitions"]["parameters"]
    assert params["batch_size"]["defaultValue"] == cfg.train.batch_size  # the run form's default
    # the sections each task runs with are compiled in as JSON: the ones the plan judged
    train, evaluate = cfg.train, cfg.eval
    assert f'"batch_size":{train.batch_size},"grad_accum":{train.grad_accum},' in compiled
    assert f'"batch_size":{evaluate.batch_size},"max_new_tokens":{evaluate.max_new_tokens}' in compiled


def test_serving_splits_a_model_over_the_gpus_given_and_says_how_many_it_needs():
    """`--gpu 2xRTX4090`: each training stage is planned per GPU (data parallel holds a whole copy on each), and
    serving per GPU of a tensor-parallel split over all of them; a split that does not fit names the one that
    does (the deployer passes deploy.accelerator_count on as --tensor-parallel-size / --num-shard)."""
    cfg = load_config("cluster")
    assert (mp.gpu_count("2xRTX4090"), mp.gpu_bytes("2xRTX4090")) == (2, 24 * mp.GB)
    assert (mp.gpu_count("H100"), mp.gpu_count("80"), mp.gpu_bytes("1xH100")) == (1, 1, 80 * mp.GB)

    def serve(model: str, gpu: str):
        verdict = next(v for v in plan(cfg, config(model), gpu, 128, 256) if v.plan.stage == "serve")
        return verdict.fits, verdict.advice, verdict.plan.total / mp.GB

    fits, advice, per_gpu = serve("llama-3.1-70b", "8xRTX4090")
    assert fits and advice == "fits with deploy.accelerator_count=8 (tensor parallel over 8)" and per_gpu < 24
    assert serve("llama-3.1-8b", "A10G")[:2] == (True, "fits on one GPU")
    # 16 bits need 8 of these; one alone holds neither form
    fits, advice, _ = serve("llama-3.1-70b", "RTX4090")
    assert (
        not fits
        and advice == "refused on 1 GPU(s): needs deploy.accelerator_count=8 of these GPUs (in 4 bits on TGI: 2)"
    )


def test_a_70b_serves_on_two_24_gb_gpus_in_4_bits_on_tgi_as_its_adapter_on_the_base():
    """16 bits of a 70B need 8 x 24 GB. NF4 at load (TGI's --quantize bitsandbytes-nf4; vLLM 0.32 has no 4-bit
    quantization at load) split over 2 fits, with the adapter beside the base: the form QLoRA trained."""
    verdicts = {v.plan.stage: v for v in plan(load_config("cluster"), config("llama-3.1-70b"), "2xRTX4090", 128, 256)}
    serve = verdicts["serve"]
    assert serve.fits and serve.plan.total <= 24 * mp.GB
    assert (
        "deploy.engine=tgi deploy.accelerator_count=2" in serve.advice
        and "recommended_quantize=bitsandbytes-nf4" in serve.advice
    )
    assert "16 bits need deploy.accelerator_count=8" in serve.advice
    # the weights' share is evaluate's NF4 base without the float32 adapter, which is served in 16 bits beside it
    nf4 = (
        verdicts["evaluate"].plan.items["model and adapter / 2"]
        - mp.lora_params(mp.model_shape(config("llama-3.1-70b")), load_config("cluster").train) * 4 / 2
    )
    assert serve.plan.items["NF4 weights / 2"] == pytest.approx(nf4)
    assert 0 < serve.plan.items["LoRA adapter / 2"] / mp.GB < 1
    # a 16-bit LoRA trained against no NF4 rounding: the merge in NF4, where its quantize report says it holds
    lora = {
        v.plan.stage: v
        for v in plan(
            load_config("cluster", ["train.method=lora", "train.quantization=none"]),
            config("llama-3.1-70b"),
            "2xRTX4090",
            128,
            256,
        )
    }
    assert "the quantize report recommends recommended_quantize=bitsandbytes-nf4" in lora["serve"].advice
    # on one H100 the NF4 form fits too, without a split
    one = {v.plan.stage: v for v in plan(load_config("cluster"), config("llama-3.1-70b"), "H100", 128, 256)}
    assert one["serve"].fits and one["serve"].advice.startswith("fits in 4 bits: deploy.engine=tgi serving the base")


def test_quantize_splits_the_merge_over_the_pods_gpus_and_says_why_where_it_cannot():
    cfg, model = load_config("cluster"), config("llama-3.1-70b")
    two_h100 = {v.plan.stage: v for v in plan(cfg, model, "2xH100", 128, 256)}["quantize"]
    assert two_h100.fits and two_h100.advice.endswith("its layers split over the 2 GPUs")
    assert two_h100.plan.items["16-bit merge (the largest variant) / 2"] / mp.GB == pytest.approx(141.1 / 2, 0.01)
    small = {v.plan.stage: v for v in plan(cfg, model, "2xRTX4090", 128, 256)}["quantize"]
    assert not small.fits and "over 2 GPUs: the 16-bit merge cannot be scored on these GPUs" in small.advice


def test_a_70b_evaluates_on_one_h100_in_the_form_it_trained_in():
    """The 16-bit 70B (141 GB) fits no 80 GB GPU; eval.base_form auto plans the NF4 base with the adapter, which
    does, while quantize (which scores the 16-bit merge) is still refused."""
    verdicts = {v.plan.stage: v for v in plan(load_config("cluster"), config("llama-3.1-70b"), "H100", 128, 256)}
    assert verdicts["evaluate"].fits and "on the NF4 base (the trained condition" in verdicts["evaluate"].advice
    assert verdicts["evaluate"].plan.items["model and adapter"] / mp.GB < 45
    assert not verdicts["quantize"].fits


def test_a_70b_trains_and_evaluates_on_two_24_gb_gpus_by_sharding():
    """The done-when of going past one GPU: one 24 GB GPU cannot hold the 70B's NF4 base (43.7 GB as trained), so
    the plan shards it: training with FSDP over both GPUs, with the shards in host memory (train.cpu_offload), and
    evaluation with the NF4 base's layers split over the two."""
    cfg = load_config("cluster")
    verdicts = {v.plan.stage: v for v in plan(cfg, config("llama-3.1-70b"), "2xRTX4090", 128, 256)}
    train, evaluate = verdicts["train"], verdicts["evaluate"]
    assert train.fits and "train.strategy=fsdp train.num_processes=2 train.cpu_offload=true" in train.advice
    assert train.plan.total <= 24 * mp.GB and train.plan.offloaded / mp.GB == pytest.approx(43.7 / 2 + 3.3 / 2, 0.02)
    assert "87 GB of host memory to load the base" in train.advice  # each process loads the NF4 base before sharding
    assert evaluate.fits and "its layers split over the 2 GPUs" in evaluate.advice
    assert evaluate.plan.items["model and adapter / 2"] / mp.GB == pytest.approx(40.3 / 2, 0.02)
    # on one of these GPUs, neither fits
    alone = {v.plan.stage: v for v in plan(cfg, config("llama-3.1-70b"), "RTX4090", 128, 256)}
    assert not alone["train"].fits and not alone["evaluate"].fits


def test_fsdp_splits_the_base_and_the_lora_state_and_gathers_two_layers():
    shape = mp.model_shape(config("llama-3.1-8b"))
    single = load_config("cluster").train.model_copy(update={"gradient_checkpointing": True})
    sharded = single.model_copy(update={"strategy": "fsdp", "num_processes": 4})
    one, four = (mp.train_plan(shape, s, 1024, 256) for s in (single, sharded))
    assert four.items["base weights"] == pytest.approx(one.items["base weights"] / 4)
    lora = "LoRA weights, gradients, Adam"
    assert four.items[lora] == pytest.approx(one.items[lora] / 4)
    assert four.items["activations"] == one.items["activations"]  # each process runs its own micro-batch
    linear_nf4 = one.items["base weights"] - shape.other_params * 4  # the other weights are float32 in QLoRA
    assert four.items["two layers gathered"] == pytest.approx(2 * linear_nf4 / shape.layers)
    assert "two layers gathered" not in one.items and one.offloaded == four.offloaded == 0
