"""The reports one stage hands the next, typed: written and read through these models, so a field renamed or
mistyped on one side fails where the report crosses, not in a registry tag downstream.

`merge_report.json` (merge → quantize, register) and `quantize_report.json` (quantize → register, the gate through
the version's tags); the file names live in components/artifacts.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from components.registry_tags import QUANTIZE_TAG


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def write(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2, exclude_none=True))

    @classmethod
    def read(cls, path: Path):
        return cls.model_validate_json(Path(path).read_text())


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
