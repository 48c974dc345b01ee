"""The Kubeflow run form: the knobs people change per run, flat and typed, plus one `config_overrides`.

The compiled pipeline's parameters are these fields (named the way Google's LLM pipelines in GCPC name theirs)
and `config_overrides`, which reaches every other field as YAML or `key=value` lines. Its first task,
`resolve config`, lays the form and the overrides over the profile the pipeline was compiled from, validates the
whole, and hands each stage only its own section, so kfp's cache keys stay per stage. A wrong value fails that
task, naming the form parameter and what it accepts, before any GPU pod is scheduled.
"""

from __future__ import annotations

import copy
import json
import typing
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from components.profiles import apply_overrides, current_key, current_names, model_at
from pipelines.config import PipelineConfig

# Form parameter -> the config field it sets, in the order the form shows them.
FORM: dict[str, str] = {
    "base_model": "model.base_model",
    "data_uri": "data.path",
    "data_format": "data.format",
    "label_field": "data.label_field",
    "registered_model_name": "registry.model_name",
    "max_steps": "train.max_steps",
    "learning_rate": "train.learning_rate",
    "batch_size": "train.batch_size",
    "lora_rank": "train.lora_r",
    "eval_examples": "data.max_eval_examples",
    "gate_min_gain": "gate.min_gain_over_base",
    "accelerator_type": "placement.accelerator_type",
    "accelerator_count": "placement.accelerator_count",
}
OVERRIDES_HELP = (
    "any other config field, as YAML (`train: {warmup_ratio: 0.1}` or `train.warmup_ratio: 0.1`) or as "
    "`key=value` lines (`train.warmup_ratio=0.1`); `llmops config` lists every field"
)
# Placement that kfp writes into the pod specs at compile time; a run cannot change it.
COMPILED_IN = ("node_selector", "tolerations", "resources")
# The sections each stage receives, as the resolve task's outputs.
SECTION_OUTPUTS = {
    "model_cfg": "model",
    "data_cfg": "data",
    "train_cfg": "train",
    "eval_cfg": "eval",
    "merge_cfg": "merge",
    "quantize_cfg": "quantize",
    "registry_cfg": "registry",
    "gate_cfg": "gate",
}


def _field(dotted: str):
    section, name = dotted.split(".")
    return PipelineConfig.model_fields[section].annotation.model_fields[name]


def describe_parameter(parameter: str) -> str:
    field = _field(FORM[parameter])
    choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is Literal else ()
    extra = f" (one of {', '.join(map(str, choices))})" if choices else ""
    unset = ' ("" for none)' if field.default is None else ""  # an optional field is a string where "" unsets it
    return f"{field.description}{extra}{unset} [{FORM[parameter]}]"


def form_values(cfg: PipelineConfig) -> dict[str, Any]:
    """The form's defaults: the profile's own values."""
    values = {}
    for parameter, dotted in FORM.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        values[parameter] = "" if value is None else value
    return values


def resolve(profile_json: str, form: dict[str, Any], overrides: str = "", pipeline_root: str = "") -> PipelineConfig:
    """The profile, then the form, then the overrides, validated; errors name the form parameter.

    Checkpoints go under a durable pipeline root unless a root was chosen, so a preempted train step resumes.
    """
    raw = json.loads(profile_json)
    if raw["train"].get("checkpoint_root") is None and (durable := checkpoint_root_under(pipeline_root)):
        raw["train"]["checkpoint_root"] = durable
    for parameter, value in form.items():
        section, name = FORM[parameter].split(".")
        raw[section][name] = None if value == "" and _field(FORM[parameter]).default is None else value
    compiled_in = copy.deepcopy({key: raw["placement"][key] for key in COMPILED_IN})
    raw = _overlay(raw, overrides)
    if moved := [key for key in COMPILED_IN if raw["placement"].get(key) != compiled_in[key]]:
        raise ValueError(
            f"config_overrides: placement.{', placement.'.join(moved)} shape the pods and are compiled in; "
            "set them when compiling: llmops compile --profile cluster placement.resources.train.memory=64Gi ..."
        )
    _one_process_per_gpu(raw)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ValueError(_explain(err)) from None


def _one_process_per_gpu(raw: dict) -> None:
    """train.num_processes left unset follows the run's accelerator_count on a GPU run: four GPUs, four
    processes (a count the profile or the overrides give is kept)."""
    train, placement = raw.get("train"), raw.get("placement")
    if not (isinstance(train, dict) and isinstance(placement, dict)):
        return  # validation names what is wrong with the section
    count = placement.get("accelerator_count")
    if train.get("num_processes") is None and train.get("use_gpu") is True and isinstance(count, int) and count > 0:
        train["num_processes"] = count


def checkpoint_root_under(pipeline_root: str) -> str | None:
    """An S3 checkpoint root under a kfp pipeline root in S3 or MinIO (KFP's default, `minio://mlpipeline/...`,
    reached through the `llmops-s3` Secret's endpoint); None for a local root, where the stage's default holds."""
    for scheme in ("s3://", "minio://"):
        if pipeline_root.startswith(scheme):
            return "s3://" + pipeline_root.removeprefix(scheme).rstrip("/") + "/llmops-checkpoints"
    return None


def _overlay(raw: dict, text: str) -> dict:
    if not text.strip():
        return raw
    lines = [line.strip() for line in text.strip().splitlines() if line.strip() and not line.strip().startswith("#")]
    if all("=" in line and ":" not in line.split("=", 1)[0] for line in lines):
        return apply_overrides(raw, lines, PipelineConfig)
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"config_overrides: neither YAML nor key=value lines: {err}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"config_overrides: expected a mapping or key=value lines, got {type(parsed).__name__}")
    for key, value in parsed.items():
        key = current_key(PipelineConfig, str(key))  # a renamed key reaches its current field
        if isinstance(value, dict) and (section := model_at(PipelineConfig, key)):
            value = current_names(section, value)
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _merged(node.get(leaf), value)
    return raw


def _merged(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{key: _merged(old.get(key), value) for key, value in new.items()}}
    return new


def _explain(err: ValidationError) -> str:
    by_field = {dotted: parameter for parameter, dotted in FORM.items()}
    problems = []
    for error in err.errors():
        dotted = ".".join(map(str, error["loc"]))
        where = f"{by_field[dotted]} ({dotted})" if dotted in by_field else f"config_overrides: {dotted or 'config'}"
        given = f" Given: {error['input']!r}" if dotted else ""
        problems.append(f"{where}: {error['msg']}.{given}")
    return "invalid run parameters:\n  " + "\n  ".join(problems)
