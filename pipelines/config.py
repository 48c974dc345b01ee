"""The whole pipeline's settings: every stage's section plus GPU placement, loaded from a profile.

Profiles are YAML files in pipelines/configs (local, cluster, banking77) or any path; `key=value` overrides
follow. The stage sections themselves are declared in `components/config.py`, where the stages read them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from components.config import (
    DataSection,
    EvalSection,
    GateSection,
    MergeSection,
    ModelSection,
    QuantizeSection,
    RegistrySection,
    Section,
    TrainSection,
)
from components.profiles import Profiled, load_settings

PROFILE_DIR = Path(__file__).resolve().parent / "configs"


# Per task: a 1B model's needs with headroom. Host memory covers loading the 16-bit weights (base model, train's
# quantization on load) and the merge's float32 copies (two of the model, 8 GB for 1B).
TASK_RESOURCES = {
    "resolve-config": {"cpu": "500m", "memory": "512Mi"},
    "base-model": {"cpu": "2", "memory": "16Gi"},
    "prepare-data": {"cpu": "2", "memory": "8Gi"},
    "train": {"cpu": "8", "memory": "32Gi"},
    "evaluate": {"cpu": "4", "memory": "24Gi"},
    "merge": {"cpu": "4", "memory": "32Gi"},
    "quantize": {"cpu": "4", "memory": "24Gi"},
    "register": {"cpu": "2", "memory": "16Gi"},
    "gate": {"cpu": "1", "memory": "2Gi"},
    "set-alias": {"cpu": "500m", "memory": "512Mi"},
    "finalize": {"cpu": "500m", "memory": "1Gi"},
}


class PlacementSection(Section):
    """Where the GPU stages (train, evaluate, merge, quantize) run in a cluster; kfp.local ignores it."""

    accelerator_type: str = Field("nvidia.com/gpu", description="the GPU resource each GPU task requests")
    accelerator_count: int = Field(1, ge=0, description="GPUs each GPU task requests")
    node_selector: dict[str, str] = Field(
        {"nvidia.com/gpu.present": "true"}, description="node labels the GPU pods must match"
    )
    tolerations: list[dict[str, str]] = Field(
        [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="tolerations of the GPU pods (Kubernetes toleration objects)",
    )
    resources: dict[str, dict[str, str]] = Field(
        default_factory=lambda: dict(TASK_RESOURCES),
        description="CPU and memory of each task, by task name ({cpu, memory}); requests equal limits, so the "
        "pods are Guaranteed. Sized for a 1B model; see the README for 8B",
    )

    @field_validator("resources", mode="before")
    @classmethod
    def _over_the_defaults(cls, given: dict) -> dict:
        """`placement.resources.merge.memory=80Gi` changes that one value; the other tasks keep their sizes."""
        merged = {task: dict(sizes) for task, sizes in TASK_RESOURCES.items()}
        for task, sizes in (given or {}).items():
            merged.setdefault(task, {}).update(sizes)
        return merged

    @model_validator(mode="after")
    def _every_task_sized(self) -> PlacementSection:
        for task, sizes in self.resources.items():
            if set(sizes) != {"cpu", "memory"}:
                raise ValueError(f"placement.resources.{task} needs exactly cpu and memory, got {sorted(sizes)}")
        return self


class PipelineConfig(Profiled):
    model: ModelSection = Field(ModelSection(), description="base-model stage: which model, converted to 16 bits")
    data: DataSection = Field(DataSection(), description="prepare-data stage: reading, rendering and splitting rows")
    train: TrainSection = Field(TrainSection(), description="train stage: QLoRA or LoRA, checkpoints, validation")
    eval: EvalSection = Field(EvalSection(), description="evaluate stage: the base and the tuned model side by side")
    merge: MergeSection = Field(MergeSection(), description="merge stage: the adapter folded into 16-bit weights")
    quantize: QuantizeSection = Field(QuantizeSection(), description="quantize stage: TGI's --quantize variants scored")
    registry: RegistrySection = Field(RegistrySection(), description="register stage: the MLflow model and its tags")
    gate: GateSection = Field(GateSection(), description="gate stage: the verdict that decides the challenger alias")
    placement: PlacementSection = Field(PlacementSection(), description="cluster placement: nodes, GPUs, resources")

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    @model_validator(mode="after")
    def _validation_needs_a_slice(self) -> PipelineConfig:
        if self.train.eval_every and not self.data.val_examples:
            raise ValueError("train.eval_every needs a validation slice: set data.val_examples")
        return self


def load_config(profile: str = "local", overrides: list[str] | None = None) -> PipelineConfig:
    """A profile by name (pipelines/configs/NAME.yaml) or by path, then `key=value` overrides."""
    return load_settings(PipelineConfig, profile, PROFILE_DIR, overrides)
