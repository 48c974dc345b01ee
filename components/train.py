"""QLoRA training: 4-bit NF4 base, LoRA adapter, loss on the response tokens only.

Checkpoints go to a directory keyed by the training inputs, so a killed step that is started
again with the same inputs resumes from the last complete checkpoint instead of step 0.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from components.config import TrainSection
from components.jsonl import read_jsonl
from components.storage import MANIFEST
from components.checkpoints import Durable, PreemptionCallback, last_complete_checkpoint
from components.util import console, heading, quiet_libraries, read_json, record_config, write_json

IGNORE_INDEX = -100


def bnb_config(cfg: TrainSection):
    import torch
    from transformers import BitsAndBytesConfig

    if cfg.quantization != "nf4":
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype))


def lora_config(cfg: TrainSection):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM", bias="none")


def training_args(cfg: TrainSection, output_dir: Path):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=round(cfg.warmup_ratio * cfg.max_steps),
        logging_steps=cfg.log_every, save_strategy="steps", save_steps=cfg.checkpoint_every,
        save_total_limit=2, seed=cfg.seed, data_seed=cfg.seed, use_cpu=not cfg.use_gpu,
        bf16=cfg.compute_dtype == "bfloat16", activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        train_sampling_strategy="group_by_length", include_num_input_tokens_seen="non_padding",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, optim="adamw_torch",
        ddp_backend=("nccl" if cfg.use_gpu else "gloo") if cfg.num_processes > 1 else None,
        ddp_find_unused_parameters=False if cfg.num_processes > 1 else None,
    )


def tokenize(examples: list[dict], tok):
    """Prompt tokens get IGNORE_INDEX labels; the answer and its EOS are learned."""
    from datasets import Dataset

    prompts = tok([e["prompt"] for e in examples], add_special_tokens=False)["input_ids"]
    answers = tok([e["completion"] for e in examples], add_special_tokens=False)["input_ids"]
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for p, a in zip(prompts, answers):
        rows["input_ids"].append(p + a)
        rows["attention_mask"].append([1] * (len(p) + len(a)))
        rows["labels"].append([IGNORE_INDEX] * len(p) + a)
    return Dataset.from_dict(rows)


class AnswerBatches:
    """Left-pads a batch so every answer ends at the last position, and asks the model for logits over the
    answer window only. The LM head is ~20% of a small model's FLOPs, and full-sequence logits over a 49k
    vocabulary dominate its activation memory; the loss reads none outside the answers."""

    def __init__(self, tok):
        from transformers import DataCollatorForSeq2Seq

        tok.padding_side = "left"
        self.pad = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=IGNORE_INDEX)

    def __call__(self, features):
        batch = self.pad(features)
        # positions as if unpadded, so a row is computed the same whatever its batch
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        learned = (batch["labels"] != IGNORE_INDEX).any(0).nonzero()
        first = int(learned[0]) if len(learned) else batch["labels"].shape[1] - 1
        batch["logits_to_keep"] = batch["labels"].shape[1] - first + 1  # the logit before each answer token
        return batch


def answer_loss(outputs, labels, num_items_in_batch=None):
    """Token-level cross-entropy over the kept logits window; normalized by the Trainer's token count, so
    gradient accumulation and data parallelism weigh every answer token alike."""
    import torch.nn.functional as F

    logits = outputs.logits[:, :-1].float()
    targets = labels[:, labels.shape[1] - logits.shape[1]:].to(logits.device)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    return total / count


def load_model(cfg: TrainSection, base_dir: Path):
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    quant = bnb_config(cfg)
    # each data-parallel rank on its own GPU: a 4-bit model stays where it is loaded
    device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))} if cfg.use_gpu else None
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, device_map=device_map,
                                                 dtype=getattr(torch, cfg.compute_dtype))
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(cfg))


def make_callback(tracker, total_steps: int):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers import TrainerCallback

    class Progressive(TrainerCallback):
        """Rich progress bar, plus loss, learning rate and non-padding tokens/s to MLflow."""

        def __init__(self):
            self.bar = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)
            self.task = None
            self.mark = (time.perf_counter(), 0)

        def on_train_begin(self, args, state, control, **kw):
            self.bar.start()
            self.task = self.bar.add_task("train", total=total_steps, completed=state.global_step, info="")
            self.mark = (time.perf_counter(), state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            now, seen = time.perf_counter(), state.num_input_tokens_seen
            tps = (seen - self.mark[1]) / max(now - self.mark[0], 1e-9)
            self.mark = (now, seen)
            metrics = {k: v for k, v in (logs or {}).items() if k in ("loss", "learning_rate", "grad_norm")}
            if "loss" in metrics:
                metrics["tokens_per_s"] = tps
                self.bar.update(self.task, info=f"loss {metrics['loss']:.3f} · {tps:.0f} tok/s")
            tracker.log_metrics({f"train.{k}": v for k, v in metrics.items()}, step=state.global_step)

        def on_train_end(self, args, state, control, **kw):
            self.bar.stop()

    return Progressive()


def run(cfg: TrainSection, base_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    if cfg.num_processes > 1 and "LOCAL_RANK" not in os.environ:
        from components.parallel import launch

        return launch(cfg, base_dir, data_dir, out_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # rank 0 alone logs the stage's run
    return train(cfg, base_dir, data_dir, out_dir)


def validation_for(cfg: TrainSection, base_dir: Path, data_dir: Path, durable: Durable, tracker, started: float):
    """The validation callback when train.eval_every asks for it; labels come from the prepared data."""
    if not cfg.eval_every:
        return None
    from components.validation import make_callback

    val_file, label_file = Path(data_dir) / "val.jsonl", Path(data_dir) / "labels.json"
    if not (val_file.exists() and label_file.exists()):
        raise FileNotFoundError(f"train.eval_every={cfg.eval_every} needs {val_file} and {label_file}: a label "
                                "task prepared with data.val_examples > 0")
    return make_callback(cfg, base_dir, read_jsonl(val_file), read_json(label_file), durable, tracker, started)


def summarize(trainer, result, resume, elapsed: float, trainable: int, examples: int) -> dict:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": trainer.state.global_step, "resumed_from_step": int(resume.name.split("-")[-1]) if resume else 0,
        "train_loss": result.training_loss, "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None, "seconds": elapsed,
        "non_padding_tokens": trainer.state.num_input_tokens_seen,
        "tokens_per_s": trainer.state.num_input_tokens_seen / max(elapsed, 1e-9),
        "trainable_parameters": trainable, "examples": examples,
    }


def train(cfg: TrainSection, base_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    from transformers import AutoTokenizer, PrinterCallback, Trainer, set_seed

    from components.compute import resolved_choices
    from components.inference import load_tokenizer
    from components.tracking import stage_run

    started = time.perf_counter()
    quiet_libraries()
    heading("train")
    out_dir = Path(out_dir)
    record_config(out_dir, "train", cfg)
    durable = Durable.for_run(cfg, base_dir, data_dir)
    ckpt_root = durable.local
    resume = last_complete_checkpoint(ckpt_root) if "LOCAL_RANK" in os.environ else durable.restore()
    tok = AutoTokenizer.from_pretrained(base_dir)
    dataset = tokenize(read_jsonl(Path(data_dir) / "train.jsonl"), tok)
    with stage_run("train", cfg.model_dump(), {"llmops.checkpoint_dir": durable.where}) as tracker:
        run_cfg = resolved_choices(cfg, base_dir, data_dir, ckpt_root)
        tracker.set_tags({"train.compute_dtype": run_cfg.compute_dtype,
                          "train.gradient_checkpointing": run_cfg.gradient_checkpointing})
        set_seed(cfg.seed)  # before the adapter exists: its initial weights come from the global RNG
        model = load_model(run_cfg, base_dir)
        trainable, total = model.get_nb_trainable_parameters()
        console.print(f"{trainable:,} trainable of {total:,} parameters; checkpoints in {ckpt_root}"
                      + (f"; resuming from {resume.name}" if resume else ""))
        collator = AnswerBatches(load_tokenizer(base_dir))
        preempted = PreemptionCallback.install()
        validation = validation_for(cfg, base_dir, data_dir, durable, tracker, started)
        callbacks = [make_callback(tracker, cfg.max_steps), durable.callback(), preempted, validation]
        trainer = Trainer(model=model, args=training_args(run_cfg, ckpt_root), train_dataset=dataset,
                          data_collator=collator, compute_loss_func=answer_loss, callbacks=[c for c in callbacks if c is not None])
        trainer.remove_callback(PrinterCallback)  # our callback reports; the printer would repeat it raw
        train_started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        elapsed = time.perf_counter() - train_started
        preempted.exit_if_signalled()  # the checkpoint is saved: leave, so the retried pod resumes from it
        if not trainer.is_world_process_zero():
            return {}
        model.save_pretrained(out_dir)  # the output artifact is the adapter directory itself
        if validation and validation.best:  # the best adapter seen on validation, not merely the last one
            shutil.copytree(ckpt_root / validation.best["dir"], out_dir, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(MANIFEST))  # an S3 restore brings its manifest
        tok.save_pretrained(out_dir, save_jinja_files=False)
        metrics = summarize(trainer, result, resume, elapsed, trainable, len(dataset))
        metrics.update({"compute_dtype": run_cfg.compute_dtype, "gradient_checkpointing": run_cfg.gradient_checkpointing,
                        "stage_seconds": time.perf_counter() - started})
        if validation:
            metrics.update(validation.summary(out_dir))
            # validation pauses are not training: tokens/s counts the time spent on training steps only
            metrics["tokens_per_s"] = metrics["non_padding_tokens"] / max(elapsed - validation.seconds_spent, 1e-9)
        write_json(out_dir / "history.json", trainer.state.log_history)
        write_json(out_dir / "train_metrics.json", metrics)
        tracker.log_stats(metrics, prefix="train_summary")
    console.print(f"trained {metrics['steps']} steps in {elapsed:.0f}s, loss {metrics['first_loss']} → {metrics['last_loss']}")
    return metrics


if __name__ == "__main__":  # a torchrun worker: python -m components.train CFG_JSON BASE DATA OUT
    run(TrainSection.model_validate_json(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
