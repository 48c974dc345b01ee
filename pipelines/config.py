"""The whole pipeline's settings: every stage's section plus GPU placement, loaded from a profile.

Profiles are YAML files in pipelines/configs (local, cluster, banking77) or any path; `key=value` overrides
follow. The stage sections themselves are declared in `components/config.py`, where the stages read them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import Field, model_validator

from components.config import (
    DataSection,
    EvalSection,
    GateSection,
    MergeSection,
    ModelSection,
    Profiled,
    QuantizeSection,
    RegisterSection,
    Section,
    TrainSection,
    load_settings,
)

PROFILE_DIR = Path(__file__).resolve().parent / "configs"


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


class PipelineConfig(Profiled):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    merge: MergeSection = MergeSection()
    quantize: QuantizeSection = QuantizeSection()
    registry: RegisterSection = RegisterSection()
    gate: GateSection = GateSection()
    placement: PlacementSection = PlacementSection()

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
