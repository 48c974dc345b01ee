import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from components import answer_batches, checkpoints
from components.config import TrainSection
from components.jsonl import read_jsonl
from components.stages import train

pytestmark = pytest.mark.unit


def test_labels_cover_the_answer_and_eos_only(tiny_base, demo_prepared):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    examples = read_jsonl(demo_prepared / "train.jsonl")[:4]
    ds = answer_batches.tokenize(examples, tok)
    for ex, row in zip(examples, ds):
        learned = [t for t in row["labels"] if t != answer_batches.IGNORE_INDEX]
        assert tok.decode(learned) == ex["answer"] + tok.eos_token
        assert learned[-1] == tok.eos_token_id != tok.pad_token_id
        assert row["labels"][: ex["prompt_tokens"]] == [answer_batches.IGNORE_INDEX] * ex["prompt_tokens"]


def test_config_becomes_library_objects():
    cfg = TrainSection(lora_r=4, lora_alpha=8, target_modules=["q_proj"], compute_dtype="bfloat16")
    bnb = train.quantization(cfg)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    lora = train.lora_config(cfg)
    assert lora.r == 4 and lora.lora_alpha == 8 and set(lora.target_modules) == {"q_proj"}
    assert train.quantization(TrainSection(method="lora", quantization="none")) is None
    args = train.training_args(
        TrainSection(max_steps=9, checkpoint_every=3, compute_dtype="bfloat16", gradient_checkpointing=False), "/tmp/x"
    )
    assert args.max_steps == 9 and args.save_steps == 3 and args.train_sampling_strategy == "group_by_length"
    assert args.bf16 and not args.activation_checkpointing


def test_auto_choices_follow_the_measurements(tiny_base, monkeypatch):
    from components import compute

    rates = {"torch.float32": 100.0, "torch.bfloat16": 300.0}
    monkeypatch.setattr(compute, "matmul_rate", lambda dtype: rates[str(dtype)])
    monkeypatch.setattr(compute, "free_memory", lambda use_gpu: 20e9)
    cfg = compute.choose(TrainSection(), tiny_base, longest=64)
    assert cfg.compute_dtype == "bfloat16" and cfg.gradient_checkpointing is False  # a tiny batch fits easily
    rates["torch.bfloat16"] = 110.0  # bf16 barely faster: not worth its coarser rounding
    # little memory left: just what the plan with recomputation needs for 2,048-token rows, of which the batch's
    # activations without it are over half
    from components import memory_plan

    shape, on = memory_plan.model_shape(tiny_base), TrainSection(compute_dtype="float32", gradient_checkpointing=True)
    little = memory_plan.train_plan(shape, on, 2048, 2048).total * 1.01
    off = memory_plan.train_plan(shape, on.model_copy(update={"gradient_checkpointing": False}), 2048, 2048)
    assert off.items["activations"] + off.items["logits over the answers"] > little / 2
    monkeypatch.setattr(compute, "free_memory", lambda use_gpu: little)
    cfg = compute.choose(TrainSection(), tiny_base, longest=2048)
    assert cfg.compute_dtype == "float32" and cfg.gradient_checkpointing is True
    explicit = compute.choose(TrainSection(compute_dtype="bfloat16", gradient_checkpointing=False), tiny_base, 64)
    assert (explicit.compute_dtype, explicit.gradient_checkpointing) == ("bfloat16", False)


def test_training_moves_the_adapter_and_not_the_base(tiny_base, tiny_adapter):
    adapter = load_file(tiny_adapter / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().sum()) > 0 for v in lora_b)  # B starts at zero: non-zero means it learned
    metrics = json.loads((tiny_adapter / "train_metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["last_loss"] < metrics["first_loss"]
    assert metrics["tokens_per_s"] > 0 and metrics["non_padding_tokens"] > 0


def test_base_weights_unchanged_by_training(tiny_base, tiny_adapter):
    from components.util import tree_sha256

    recorded = json.loads((tiny_base / "llmops_base.json").read_text())["weights_sha256"]
    assert tree_sha256(tiny_base, suffix=".safetensors") == recorded
    base = load_file(tiny_base / "model.safetensors")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16), tiny_adapter
    )
    merged = model.merge_and_unload()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[name], base[name])  # the adapter does change q_proj...
    assert torch.equal(load_file(tiny_base / "model.safetensors")[name], base[name])  # ...but never the file


def test_half_written_checkpoint_is_skipped(tmp_path):
    good = tmp_path / "checkpoint-4"
    good.mkdir()
    (good / "adapter_model.safetensors").write_bytes(b"x")
    (good / "trainer_state.json").write_text("{}")
    torn = tmp_path / "checkpoint-6"  # killed before trainer_state.json was written
    shutil.copytree(good, torn)
    (torn / "trainer_state.json").unlink()
    broken = tmp_path / "checkpoint-8"  # killed while writing trainer_state.json
    shutil.copytree(good, broken)
    (broken / "trainer_state.json").write_text('{"global_st')
    assert checkpoints.last_complete_checkpoint(tmp_path) == good
    assert checkpoints.last_complete_checkpoint(tmp_path / "empty") is None


def test_answer_window_gives_the_full_sequence_loss_and_gradients(tiny_base, demo_prepared):
    """Left padding plus logits over the answers only must train exactly like the plain right-padded batch."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    tok = AutoTokenizer.from_pretrained(tiny_base)
    rows = list(answer_batches.tokenize(read_jsonl(demo_prepared / "train.jsonl")[:6], tok))
    assert len({len(r["input_ids"]) for r in rows}) > 1  # the batch needs padding for the test to mean anything
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
        train.lora_config(TrainSection(lora_r=4, lora_alpha=8)),
    )
    model.eval()  # no dropout: both passes must see the same network; gradients flow all the same
    for name, p in model.named_parameters():  # B starts at zero; non-zero B makes A's gradients non-trivial too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)

    def loss_and_grads(loss):
        model.zero_grad()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=answer_batches.IGNORE_INDEX)(
        [dict(r) for r in rows]
    )
    full, full_grads = loss_and_grads(model(**plain).loss)
    batch = answer_batches.AnswerBatches(AutoTokenizer.from_pretrained(tiny_base))([dict(r) for r in rows])
    labels = batch.pop("labels")
    assert batch["logits_to_keep"] < labels.shape[1] / 2  # the window is the answers, not the whole rows
    outputs = model(**batch)
    assert outputs.logits.shape[1] == batch["logits_to_keep"]
    windowed, grads = loss_and_grads(answer_batches.answer_loss(outputs, labels))
    assert windowed == pytest.approx(full, rel=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)


def test_a_batch_past_the_token_budget_trains_in_parts_to_the_same_loss_and_gradients(
    tiny_base, demo_prepared, tmp_path
):
    """train.micro_batch_tokens: the Trainer's step over a batch split into parts of like-length rows, each
    trimmed of the padding it does not need, must give the whole batch's loss and gradients."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from components.run_budget import BudgetedTrainer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    examples = sorted(read_jsonl(demo_prepared / "train.jsonl"), key=lambda e: len(e["prompt"]))
    rows = answer_batches.answer_rows(examples[:3] + examples[-3:], tok)  # the shortest and the longest rows
    batch = answer_batches.AnswerBatches(AutoTokenizer.from_pretrained(tiny_base))([dict(r) for r in rows])
    width = batch["input_ids"].shape[1]
    budget = 3 * width  # three rows at the batch's width: two parts
    parts = answer_batches.split_batch(batch, budget)
    assert len(parts) == 2 and all(p["input_ids"].numel() <= budget for p in parts)
    assert sorted(len(p["input_ids"]) for p in parts) == [3, 3]
    assert min(p["input_ids"].shape[1] for p in parts) < width  # the short rows' part drops their padding
    assert answer_batches.split_batch(batch, 6 * width) == [batch]  # one that fits is left whole

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
        train.lora_config(TrainSection(lora_r=4, lora_alpha=8, lora_dropout=0.0)),
    )
    for name, p in model.named_parameters():  # B starts at zero; non-zero B makes A's gradients non-trivial too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)

    def step(micro_batch_tokens):
        trainer = BudgetedTrainer(
            model=model, args=args, compute_loss_func=answer_batches.answer_loss, micro_batch_tokens=micro_batch_tokens
        )
        model.zero_grad()
        loss = trainer.training_step(model, {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    whole, whole_grads = step(None)
    split, split_grads = step(budget)
    assert split == pytest.approx(whole, rel=1e-5)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_the_rows_of_a_forward_keep_under_the_budget_in_as_few_parts_as_can():
    assert answer_batches.rows_per_forward(16, 128, None) == 16
    assert answer_batches.rows_per_forward(16, 64, 1024) == 16  # fits: whole
    assert answer_batches.rows_per_forward(16, 128, 1024) == 8
    assert answer_batches.rows_per_forward(7, 280, 1000) == 3  # 3 rows x 280 = 840; 4 would be 1120
    assert answer_batches.rows_per_forward(4, 2000, 1000) == 1  # a row past the budget still trains, alone


@pytest.mark.unit
def test_a_sigterm_during_the_ranks_vote_stops_training_at_the_next_step(monkeypatch):
    """The handler runs at the first bytecode after the all-reduce returns, before its result is stored: a
    signal landing then must still stop training (one shared flag lost it, and both ranks trained on)."""
    import os
    import signal
    from types import SimpleNamespace

    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop = checkpoints.StopOnSigterm()
        votes = []

        def vote_while_signalled(flag, device):  # this rank's vote is already cast when the signal lands
            votes.append(flag)
            if len(votes) == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before this function returns
            return flag

        monkeypatch.setattr(checkpoints, "any_rank", vote_while_signalled)
        args, control = SimpleNamespace(device="cpu"), SimpleNamespace(should_save=False, should_training_stop=False)
        stop.on_step_end(args, None, control)
        assert votes == [False] and not control.should_training_stop  # this step's vote was cast before
        stop.on_step_end(args, None, control)
        assert votes == [False, True] and control.should_save and control.should_training_stop
        with pytest.raises(SystemExit) as leaving:
            stop.exit_if_signalled()
        assert leaving.value.code == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.unit
def test_validation_in_eval_mode_leaves_the_training_gradients_intact(tiny_base, demo_prepared):
    """Validation runs the QLoRA model in eval mode without grad; the next training step must compute the
    same gradients as a model that never validated (bitsandbytes' CPU inference repacking cut them)."""
    from transformers import AutoTokenizer

    cfg = TrainSection(lora_r=4, lora_alpha=8, lora_dropout=0.0, compute_dtype="bfloat16", gradient_checkpointing=False)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    rows = list(answer_batches.tokenize(read_jsonl(demo_prepared / "train.jsonl")[:4], tok))
    batch = answer_batches.AnswerBatches(AutoTokenizer.from_pretrained(tiny_base))([dict(r) for r in rows])
    labels = batch.pop("labels")

    def grads_after(validate: bool) -> dict:
        torch.manual_seed(0)
        model = train.load_model(cfg, tiny_base)
        for name, p in model.named_parameters():  # non-zero B: gradients reach A and the layers below
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
        if validate:
            model.eval()
            with torch.no_grad():
                model(**batch)
        model.train()
        answer_batches.answer_loss(model(**batch), labels).backward()
        return {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    fresh, validated = grads_after(False), grads_after(True)
    first = next(n for n in fresh if "layers.0." in n and "lora_A" in n)  # the farthest from the loss
    assert fresh[first].abs().sum() > 0
    for name, grad in fresh.items():
        torch.testing.assert_close(validated[name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_the_strategy_follows_the_process_count_and_refuses_what_cannot_run():
    from components.config import TrainSection

    assert TrainSection().parallelism == "single" and TrainSection(num_processes=2).parallelism == "ddp"
    assert TrainSection(num_processes=2, strategy="fsdp").parallelism == "fsdp"
    for bad, message in [
        ({"num_processes": 2, "strategy": "single"}, "runs one process, not 2"),
        ({"num_processes": 1, "strategy": "fsdp"}, "needs train.num_processes"),
        ({"num_processes": 2, "cpu_offload": True}, "set train.strategy=fsdp"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainSection(**bad)


def test_fsdp_takes_its_own_checkpointing_and_the_codes_in_the_compute_dtype():
    """Under FSDP the per-layer activation checkpointing is FSDP's (the Trainer's would gather each layer twice),
    and the NF4 codes are stored in the compute dtype so they can be sharded; DDP keeps uint8 and no FSDP."""
    from components.config import TrainSection
    from components.fsdp import fsdp_args

    cfg = TrainSection(num_processes=2, strategy="fsdp", gradient_checkpointing=True, compute_dtype="float32")
    settings = fsdp_args(cfg)["fsdp_config"]
    assert (settings["version"], settings["activation_checkpointing"], settings["cpu_offload"]) == (2, True, False)
    assert train.quantization(cfg).bnb_4bit_quant_storage == torch.float32
    ddp = cfg.model_copy(update={"strategy": "ddp"})
    assert fsdp_args(ddp) == {} and train.quantization(ddp).bnb_4bit_quant_storage == torch.uint8
    offloaded = cfg.model_copy(update={"cpu_offload": True})
    assert fsdp_args(offloaded)["fsdp_config"]["cpu_offload"] is True
