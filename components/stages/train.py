"""The train stage, as a recipe: QLoRA (4-bit NF4 base, LoRA adapter), loss on the answer tokens only.

Run as: `llmops stage train [train.max_steps=20]` (alone, on a local run's base model and data), or a task of
`llmops run`; under torchrun each worker comes back into `run` (`python -m components.stages.train CFG BASE DATA OUT`).

`train` reads top to bottom: checkpoint store and settings, data, model, callbacks, training, hand-over.
Checkpoints go to a store keyed by the training inputs, so a killed step that is started again with the
same inputs resumes from the last complete checkpoint instead of step 0.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from components import reports
from components.answer_batches import AnswerBatches, answer_loss, tokenize
from components.artifacts import PreparedData, TrainedAdapter, record_config
from components.checkpoints import CheckpointStore, StopOnSigterm, UploadCheckpoints, last_complete_checkpoint
from components.config import TrainSection
from components.environment import TRACKING_URI
from components.fsdp import fsdp_args, parameter_share, save_adapter
from components.inference import bnb_config
from components.progress import StageProgress
from components.run_budget import BudgetedTrainer
from components.storage import MANIFEST
from components.util import console, heading, quiet_libraries, write_json


def lora_config(cfg: TrainSection):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )


def training_args(cfg: TrainSection, output_dir: Path):
    from transformers import TrainingArguments

    fsdp = fsdp_args(cfg)
    checkpointing = bool(cfg.gradient_checkpointing) and not fsdp
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=round(cfg.warmup_ratio * cfg.max_steps),
        logging_steps=cfg.log_every,
        save_strategy="steps",
        save_steps=cfg.checkpoint_every,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not cfg.use_gpu,
        bf16=cfg.compute_dtype == "bfloat16",
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        train_sampling_strategy="group_by_length",
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        optim="adamw_torch",
        ddp_backend=("nccl" if cfg.use_gpu else "gloo") if cfg.processes > 1 else None,
        ddp_find_unused_parameters=False if cfg.parallelism == "ddp" else None,
        **fsdp,
    )


def quantization(cfg: TrainSection):
    """The base's 4-bit loading, or None for 16-bit LoRA. One function builds it (inference.bnb_config): the merge
    rebuilds the same NF4 rounding from it, so the two cannot drift apart. Under FSDP the codes are stored in the
    compute dtype, as the FSDP-QLoRA work does, so they can be sharded with the rest."""
    if cfg.quantization != "nf4":
        return None
    storage = cfg.compute_dtype if cfg.parallelism == "fsdp" else "uint8"
    return bnb_config("nf4", cfg.compute_dtype, cfg.double_quant, storage)


def load_model(cfg: TrainSection, base_dir: Path):
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    quant = quantization(cfg)
    # each data-parallel rank on its own GPU: a 4-bit model stays where it is loaded
    # (on the host when asked, even where a GPU is present: bitsandbytes would otherwise put a 4-bit model on it)
    device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))} if cfg.use_gpu else None
    if (not cfg.use_gpu and torch.cuda.is_available()) or cfg.parallelism == "fsdp":
        # FSDP: the base loads on the host, and fully_shard moves each process's shard to its GPU layer by layer
        # (a whole 70B NF4 base would not fit one 24 GB GPU before sharding)
        device_map = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=quant, device_map=device_map, dtype=getattr(torch, cfg.compute_dtype)
    )
    if quant is not None:
        # bitsandbytes repacks a 4-bit weight for its AVX512-BF16 kernel at the first forward in eval mode
        # without grad (validation), and never back: later training steps then run that kernel, which has no
        # autograd, so gradients stop flowing through every base matmul (silently; torch only warns). It also
        # rounds the scales to bfloat16, away from the codes the merge reconstructs. Training keeps the plain path.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(cfg.gradient_checkpointing) and cfg.parallelism != "fsdp",
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing and cfg.parallelism != "fsdp":
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(cfg))


class ReportProgress(TrainerCallback):
    """Training progress (components.progress: a bar on a terminal, a plain line every 15 s in a pipe), plus
    loss, learning rate and non-padding tokens/s to MLflow."""

    def __init__(self, tracker, total_steps: int):
        self.tracker, self.progress = tracker, StageProgress("train step", total_steps, end_line=True)
        self.mark = (time.perf_counter(), 0)

    def on_train_begin(self, args, state, control, **kw):
        self.progress.__enter__()
        self.progress.start_at(state.global_step)  # a resumed run: the ETA counts only the steps left
        self.mark = (time.perf_counter(), state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kw):
        self.progress.update(state.global_step)

    def on_log(self, args, state, control, logs=None, **kw):
        now, seen = time.perf_counter(), state.num_input_tokens_seen
        tps = (seen - self.mark[1]) / max(now - self.mark[0], 1e-9)
        self.mark = (now, seen)
        metrics = {k: v for k, v in (logs or {}).items() if k in ("loss", "learning_rate", "grad_norm")}
        if "loss" in metrics:
            metrics["tokens_per_s"] = tps
            self.progress.update(info=f"loss {metrics['loss']:.3f} · {tps:.0f} tok/s")
        self.tracker.log_metrics({f"train.{k}": v for k, v in metrics.items()}, step=state.global_step)

    def on_train_end(self, args, state, control, **kw):
        self.progress.__exit__(None, None, None)


def validation_callback(
    cfg: TrainSection, base_dir: Path, data_dir: Path, store: CheckpointStore, tracker, started: float
):
    """Validation and early stop when train.eval_every asks for it; the slice and labels come from the data."""
    if not cfg.eval_every:
        return None
    from components.validation import ValidateAndStop

    data = PreparedData(data_dir)
    if not (data.val_file.exists() and data.labels_file.exists()):
        raise FileNotFoundError(
            f"train.eval_every={cfg.eval_every} needs {data.val_file} and {data.labels_file}: a "
            "label task prepared with data.val_examples > 0"
        )
    eval_rows = data.stats().eval  # what the later stages score, as data prep counted it
    return ValidateAndStop(cfg, base_dir, data.examples("val"), data.labels(), store, tracker, started, eval_rows)


def summarize(trainer, result, resume, elapsed: float, trainable: int, examples: int) -> dict:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": trainer.state.global_step,
        "resumed_from_step": int(resume.name.split("-")[-1]) if resume else 0,
        "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": elapsed,
        "non_padding_tokens": trainer.state.num_input_tokens_seen,
        "tokens_per_s": trainer.state.num_input_tokens_seen / max(elapsed, 1e-9),
        "trainable_parameters": trainable,
        "examples": examples,
    }


def run(cfg: TrainSection, base_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    """The stage's entry point: one process, or torchrun workers that each come back into `train`."""
    if cfg.per_node > 1 and "LOCAL_RANK" not in os.environ:
        from components.parallel import launch

        return launch("components.stages.train", cfg, base_dir, data_dir, out_dir)  # workers come back into this module
    if int(os.environ.get("RANK", "0")) != 0:
        os.environ.pop(TRACKING_URI.name, None)  # rank 0 alone logs the stage's run
    return train(cfg, base_dir, data_dir, out_dir)


def train(cfg: TrainSection, base_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    from transformers import AutoTokenizer, PrinterCallback, set_seed

    from components.compute import run_choices
    from components.inference import load_tokenizer
    from components.tracking import stage_run

    started = time.perf_counter()
    quiet_libraries()
    heading("train")
    out = TrainedAdapter(out_dir)
    record_config(out_dir, "train", cfg)  # the section as given: lineage hashes what was asked for
    params = cfg.model_dump()  # MLflow's params too; the resolved "auto" choices become tags

    # 1. Checkpoint store, then settings. The store is keyed by the section as given, so a restarted step
    #    finds its earlier attempt's checkpoints, and the "auto" choices it measured, before measuring again.
    #    From here on `cfg` is the resolved section: the one config in flight.
    store = CheckpointStore.for_run(cfg, base_dir, data_dir)
    resume = last_complete_checkpoint(store.local) if "LOCAL_RANK" in os.environ else store.restore()
    cfg = run_choices(cfg, base_dir, data_dir, store.local)

    # 2. Data: prompt tokens are masked out of the loss; batches are left-padded so answers end together.
    tok = AutoTokenizer.from_pretrained(base_dir)
    dataset = tokenize(PreparedData(data_dir).examples("train"), tok)
    collator = AnswerBatches(load_tokenizer(base_dir))

    with stage_run("train", params, {"llmops.checkpoint_dir": store.where}) as tracker:
        tracker.set_tags(
            {"train.compute_dtype": cfg.compute_dtype, "train.gradient_checkpointing": cfg.gradient_checkpointing}
        )
        # 3. Model. The seed comes first: the adapter's initial weights are drawn from the global RNG.
        set_seed(cfg.seed)
        model = load_model(cfg, base_dir)
        trainable, total = model.get_nb_trainable_parameters()
        console.print(
            f"{trainable:,} trainable of {total:,} parameters; checkpoints in {store.local}"
            + (f"; resuming from {resume.name}" if resume else "")
        )

        # 4. Callbacks, one job each. The SIGTERM handler is installed here, once the model is built, so a
        #    signal before this point simply ends the process (there is nothing to save yet).
        sigterm = StopOnSigterm()
        validation = validation_callback(cfg, base_dir, data_dir, store, tracker, started)
        callbacks = [ReportProgress(tracker, cfg.max_steps), UploadCheckpoints(store), sigterm, validation]
        trainer = BudgetedTrainer(
            model=model,
            args=training_args(cfg, store.local),
            train_dataset=dataset,
            data_collator=collator,
            compute_loss_func=answer_loss,
            callbacks=[c for c in callbacks if c is not None],
            clock=validation.clock if validation else None,  # the schedule follows train.max_minutes' clock too
            micro_batch_tokens=cfg.micro_batch_tokens,
        )
        trainer.remove_callback(PrinterCallback)  # ReportProgress reports; the printer would repeat it raw

        # 5. Train, resuming where the last complete checkpoint left off.
        train_started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        elapsed = time.perf_counter() - train_started
        sigterm.exit_if_signalled()  # the checkpoint is saved: leave, so the retried pod resumes from it
        share = parameter_share(model)  # 1/N of the model per process under FSDP

        # 6. Hand over the adapter: the best one validation saw, not merely the last one.
        save_adapter(model, out_dir, trainer.is_world_process_zero())  # the artifact is the adapter directory
        if not trainer.is_world_process_zero():
            return {}
        if validation and validation.best:
            shutil.copytree(
                store.local / validation.best["dir"],
                out_dir,
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns(MANIFEST),
            )  # an S3 restore brings its manifest
        tok.save_pretrained(out_dir, save_jinja_files=False)
        metrics = summarize(trainer, result, resume, elapsed, trainable, len(dataset))
        metrics.update(
            {
                "compute_dtype": cfg.compute_dtype,
                "gradient_checkpointing": cfg.gradient_checkpointing,
                "parallelism": cfg.parallelism,
                "parameter_share_per_process": share,
                "stage_seconds": time.perf_counter() - started,
            }
        )
        if validation:
            metrics.update(validation.summary(out_dir))
            # validation pauses are not training: tokens/s counts the time spent on training steps only
            metrics["tokens_per_s"] = metrics["non_padding_tokens"] / max(elapsed - validation.seconds_spent, 1e-9)
        write_json(out.history_file, trainer.state.log_history)
        reports.Train.model_validate(metrics).write(out.metrics_file)  # checked where it crosses
        tracker.log_stats(metrics, prefix="train_summary")
    first, last = (f"{v:.3f}" if v is not None else "n/a" for v in (metrics["first_loss"], metrics["last_loss"]))
    console.print(f"trained {metrics['steps']} steps in {elapsed:.0f}s, loss {first} → {last}")
    return metrics


if __name__ == "__main__":  # a torchrun worker: python -m components.stages.train CFG_JSON BASE DATA OUT
    run(TrainSection.model_validate_json(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
