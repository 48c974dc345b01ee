"""The reports one stage hands the next, typed: written and read through these models, so a field renamed or
mistyped on one side fails where the report crosses, not in a registry tag downstream.

The data stats (prepare data → train's checkpoint key, register, the gate), the train metrics (train → merge,
register), the eval report (evaluate → register, the gate, the kfp task's metrics), the merge report (merge →
quantize, register) and the quantize report (quantize → register, the gate through the version's tags); the file
names live in components/artifacts.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from components.registry_tags import QUANTIZE_TAG


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def write(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2))

    @classmethod
    def read(cls, path: Path):
        return cls.model_validate_json(Path(path).read_text())


class Lengths(Report):
    min: int
    mean: float
    p50: int
    p95: int
    max: int


class Data(Report):
    """What data prep kept, rejected and wrote (stats.json)."""

    source: str
    source_sha256: str
    prepared_sha256: str  # of the written splits: what training and the gate check they read
    format: str  # label, alpaca or chat (prepare_data.detect_format)
    rows_read: int
    examples: int
    rejected: int
    reject_reasons: dict[str, int]
    train: int
    eval: int
    validation: int
    label_list_in_prompt: bool
    rows_kept: int
    num_labels: int
    prompt_tokens: Lengths
    completion_tokens: Lengths
    total_tokens: Lengths


class Train(Report):
    """What training did (train_metrics.json); the val_* figures where train.eval_every validated."""

    steps: int
    resumed_from_step: int
    train_loss: float
    first_loss: float | None
    last_loss: float | None
    seconds: float
    non_padding_tokens: int
    tokens_per_s: float
    trainable_parameters: int
    examples: int
    compute_dtype: Literal["bfloat16", "float32"]  # as measured for "auto": the merge rebuilds the NF4 base in it
    gradient_checkpointing: bool
    parallelism: Literal["single", "ddp", "fsdp"] = "single"  # absent from adapters trained before it existed
    parameter_share_per_process: float = 1.0
    stage_seconds: float
    val_best_accuracy: float | None = None
    val_best_step: int | None = None
    val_first_accuracy: float | None = None
    val_seconds_to_target: float | None = None
    val_seconds_spent: float | None = None
    budget_clock_seconds: float | None = None  # train.max_minutes' clock at the end of training
    budget_forecast_after_seconds: float | None = None  # what it kept for the stages after training
    budget_from_run_start: bool | None = None  # the clock was the run's (`llmops run`), not the stage's


class ClassScores(Report):
    precision: float
    recall: float
    f1: float
    support: int


class Confusion(Report):
    categories: list[str]  # the labels, then "<invalid>" for a free answer that is none of them
    matrix: list[list[int]]


class EvalScores(Report):
    """One model on the eval rows (components.scoring.score_model): label tasks add the label figures."""

    exact_match: float
    n: int
    loss: float
    perplexity: float
    label_accuracy: float | None = None  # decoding constrained to the label set
    constrained_decoded: int | None = None  # rows decoded under the constraint: their free answer was no label path
    agreement_where_valid: float | None = None  # written by reports before constrained_decoded (2026-12-06)
    macro_f1: float | None = None
    invalid_rate: float | None = None  # free answers that are no label
    per_class: dict[str, ClassScores] | None = None
    confusion: Confusion | None = None


class Eval(Report):
    """The base and the tuned model on the same eval rows (eval_report.json)."""

    base: EvalScores
    tuned: EvalScores
    labels: list[str] | None = None  # a label task's labels; none for free answers
    delta: dict[str, float]  # tuned minus base, per headline metric
    base_form: Literal["16bit", "nf4"]  # the base both were scored on: nf4 is the condition QLoRA trained in


class Merge(Report):
    """The merge's parity with the trained model, and what an NF4 copy of it would lose of the adapter."""

    parity: float = Field(ge=0, le=1)
    compare_dtype: Literal["float32", "bfloat16", "layerwise"]
    reference: str
    merged_into: Literal["dequantized-nf4", "16bit"]
    threshold: float
    prompts: int
    size_bytes: int
    nf4_adapter_lost: float = Field(ge=0)
    mismatches: list[dict] = []  # the first prompts whose greedy outputs differ (whole-model checks)
    max_logit_gap: float | None = None  # layerwise: the largest logit difference at an answer position
    positions: int | None = None  # layerwise: the answer positions compared


class Delta(Report):
    accuracy_drop: float
    accuracy_metric: str
    perplexity_increase: float


class Scores(Report):
    """A model scored on the eval rows (the merge, or one of its quantized variants)."""

    exact_match: float
    perplexity: float
    loss: float
    label_accuracy: float | None = None  # label tasks
    memory_bytes: int
    disk_bytes: int
    delta: Delta | None = None  # a variant's, against the merge


class NotScored(Report):
    """A variant the measured rounding says cannot hold the adapter: reported, not scored."""

    not_scored: str
    adapter_lost: float


class Served(Scores):
    quantize: str  # the TGI --quantize flag it serves under
    examples: int


class Quantize(Report):
    results: dict[str, Scores | NotScored]
    recommended_quantize: str
    served: Served
    examples: int
    thresholds: dict[str, float]


assert QUANTIZE_TAG in Quantize.model_fields  # register copies the field to the version tag of the same name
