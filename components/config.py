"""One validated config for the whole pipeline: YAML profile plus `key=value` overrides.

Each stage receives only its own section (as JSON), so a change to one section
invalidates the kfp cache of that stage and of the stages downstream of it, and nothing else.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PROFILE_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "configs"
PACKAGED_MODEL = "packaged:smollm2-135m-instruct"
DEMO_DATA = "demo"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> str:
        return self.model_dump_json()

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


class ModelSection(Section):
    base_model: str = PACKAGED_MODEL
    revision: str | None = None
    dtype: Literal["bfloat16", "float16"] = "bfloat16"


class DataSection(Section):
    path: str = DEMO_DATA
    format: Literal["auto", "alpaca", "chat", "label"] = "auto"
    text_field: str = "text"
    label_field: str | None = None
    labels: list[str] | None = None
    labels_file: str | None = None
    # "auto": list the labels in the prompt only for small label sets. A prompt listing BANKING77's 77
    # labels is ~10x the message itself, and a tuned model answers with a label without seeing the list.
    label_list_in_prompt: bool | Literal["auto"] = "auto"
    label_list_max: int = Field(20, gt=0, description="label sets up to this size are listed when auto")
    system_prompt: str = "You are a helpful assistant."
    # Precedes the message in a label task's user turn when the label list is not there. Empty: the user
    # turn is the message alone and the system prompt carries the task (a third fewer tokens on BANKING77).
    label_instruction: str = "Classify the message by its label.\nReply with the label only."
    max_tokens: int = Field(512, gt=8)
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    max_eval_examples: int = Field(200, gt=0)
    max_train_examples: int | None = Field(None, gt=0)
    val_examples: int = Field(0, ge=0, description="held out of train for validation during training")
    seed: int = 42


class TrainSection(Section):
    method: Literal["qlora", "lora"] = "qlora"
    quantization: Literal["nf4", "none"] = "nf4"
    double_quant: bool = True
    # "auto" measures matmul throughput at start (bf16 is ~3x fp32 on a recent x86 CPU, slower on older ones).
    compute_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    max_steps: int = Field(60, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(3e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    # "auto": only when the estimated activations of the longest batch would not fit in half the free memory.
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    checkpoint_every: int = Field(20, gt=0)
    checkpoint_root: str | None = None
    log_every: int = Field(5, gt=0)
    seed: int = 42
    use_gpu: bool = False
    # Data-parallel processes in one pod: one per GPU (NCCL), or CPU processes on gloo. The global
    # batch is batch_size * grad_accum * num_processes.
    num_processes: int = Field(1, ge=1)
    # Validation during training (needs data.val_examples): label accuracy every eval_every steps, the
    # best adapter kept, and an early stop once target_accuracy is reached or max_minutes have passed.
    eval_every: int = Field(0, ge=0)
    target_accuracy: float | None = Field(None, gt=0, le=1)
    max_minutes: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _qlora_needs_4bit(self) -> "TrainSection":
        if self.method == "qlora" and self.quantization != "nf4":
            raise ValueError("train.method=qlora needs train.quantization=nf4 (a 4-bit base)")
        if self.method == "lora" and self.quantization != "none":
            raise ValueError("train.method=lora trains a 16-bit base: set train.quantization=none")
        for field in ("target_accuracy", "max_minutes"):
            if getattr(self, field) and not self.eval_every:
                raise ValueError(f"train.{field} is checked with validation: set train.eval_every")
        return self


class EvalSection(Section):
    # 32: on 2 cores a batch of 32 short prompts still gains over 16 (make bench, evaluation section)
    batch_size: int = Field(32, gt=0)
    max_new_tokens: int = Field(24, gt=0)
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    sample_predictions: int = Field(20, ge=0)


class MergeSection(Section):
    # float16 keeps 4x finer steps than bfloat16: a LoRA delta much smaller than the weight it is
    # added to survives the rounding that bfloat16 would apply to the merged sum.
    base_precision: Literal["bfloat16", "float16", "nf4"] = "float16"
    compare_dtype: Literal["float32", "bfloat16"] = "float32"
    parity_prompts: int = Field(32, gt=0)
    parity_threshold: float = Field(0.9, ge=0, le=1)
    max_new_tokens: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _merge_needs_16bit(self) -> "MergeSection":
        if self.base_precision == "nf4":
            raise ValueError("merge.base_precision must be 16-bit: merging into a 4-bit base loses the adapter")
        return self


class QuantizeSection(Section):
    variants: list[Literal["int8", "nf4"]] = ["int8", "nf4"]
    eval_examples: int | None = Field(None, gt=0, description="eval rows each variant is scored on; null: all of "
                                      "them, the rows evaluate scored, so the gate compares like with like")
    max_accuracy_drop: float = Field(0.02, ge=0)
    max_perplexity_increase: float = Field(0.10, ge=0, description="relative, 0.10 = +10%")


class RegisterSection(Section):
    model_name: str = Field("llmops-demo", description="registered model name in MLflow: letters, digits, _, - and .")
    experiment: str = "llmops"

    @field_validator("model_name")
    @classmethod
    def _registry_name(cls, value: str) -> str:
        # MLflow refuses "/" and ":" in model names, and a quote would break its search filters; the name is
        # typed again in `llmops promote` and `name@alias`, so it is refused here rather than silently changed.
        if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", value):
            suggestion = re.sub(r"[^\w.\-]", "-", value).strip("-._") or "my-model"
            raise ValueError(f"registry.model_name={value!r} may hold only letters, digits, '_', '-' and '.', "
                             f"starting with a letter or digit (for example {suggestion!r})")
        return value


class GateSection(Section):
    """Promotion gate: the candidate must beat the base model and the current champion by these margins."""

    metric: Literal["exact_match", "perplexity"] = "exact_match"
    min_gain_over_base: float = 0.01
    min_gain_over_champion: float = 0.0
    champion_alias: str = "champion"
    alias_on_pass: str = "challenger"


class DeploySection(Section):
    """How a promoted version is served: TGI on Kubernetes, or the local TGI-protocol server."""

    alias: str = "champion"
    models: list[str] = Field([], description="registered model names this deployer serves (an allowlist); "
                                              "empty: every registered model")
    namespace: str = "llmops"
    # Pinned by digest: a tag can move under a running Deployment. Set the digest your registry serves.
    tgi_image: str = Field("ghcr.io/huggingface/text-generation-inference:3.3.4@sha256:" + "0" * 64,
                           pattern=r"^[^\s@]+@sha256:[0-9a-f]{64}$")
    fetch_image: str = "ghcr.io/llmops/llmops-cpu:0.1.0"
    max_input_tokens: int = Field(1024, gt=0)
    max_total_tokens: int = Field(2048, gt=0)
    max_batch_prefill_tokens: int = Field(4096, gt=0)
    gpu_resource: str = "nvidia.com/gpu"
    gpu_count: int = Field(1, ge=0)
    node_selector: dict[str, str] = {"nvidia.com/gpu.present": "true"}
    tolerations: list[dict[str, str]] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    shm_size: str = "1Gi"
    port: int = 80
    rollout_timeout_s: int = Field(900, gt=0)
    mlflow_tracking_uri: str = "http://mlflow.llmops.svc.cluster.local:5000"
    s3_secret: str = "llmops-s3"
    mlflow_secret: str = "llmops-mlflow"

    @model_validator(mode="after")
    def _token_limits(self) -> "DeploySection":
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError("deploy.max_input_tokens must be below deploy.max_total_tokens")
        return self


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str = "local"
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    merge: MergeSection = MergeSection()
    quantize: QuantizeSection = QuantizeSection()
    registry: RegisterSection = RegisterSection()
    gate: GateSection = GateSection()
    deploy: DeploySection = DeploySection()

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    @model_validator(mode="after")
    def _validation_needs_a_slice(self) -> "PipelineConfig":
        if self.train.eval_every and not self.data.val_examples:
            raise ValueError("train.eval_every needs a validation slice: set data.val_examples")
        return self


def _coerce(value: str) -> Any:
    """Parse an override value the way YAML would (numbers, booleans, lists)."""
    return yaml.safe_load(value) if value != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. train.max_steps=10)")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = _coerce(value)
    return raw


def load_config(profile: str = "local", overrides: list[str] | None = None) -> PipelineConfig:
    """Load a profile by name (pipelines/configs/NAME.yaml) or by path, then apply overrides."""
    path = Path(profile)
    if not path.suffix:
        path = PROFILE_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"config profile {profile!r} not found (known profiles: {', '.join(known)})")
    raw = yaml.safe_load(path.read_text()) or {}
    raw.setdefault("profile", path.stem)
    return PipelineConfig.model_validate(apply_overrides(raw, overrides or []))
