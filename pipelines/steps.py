"""Thin kfp components: artifact paths in, one call into components/, metrics out.

The bodies import the project's own package, which the component images carry (and which is
installed in the local venv for kfp.local), so nothing is pip-installed at run time.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from pipelines.images import CPU_IMAGE, GPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def resolve_config(
    profile_json: str,
    config_overrides: str,
    pipeline_root: str,
    base_model: str,
    data_uri: str,
    data_format: str,
    label_field: str,
    registered_model_name: str,
    max_steps: int,
    learning_rate: float,
    batch_size: int,
    lora_rank: int,
    eval_examples: int,
    gate_min_gain: float,
    accelerator_type: str,
    accelerator_count: int,
) -> NamedTuple(  # written out here: kfp runs this function's source alone, without this module
    "Sections",
    model_cfg=str,
    data_cfg=str,
    train_cfg=str,
    eval_cfg=str,
    merge_cfg=str,
    quantize_cfg=str,
    registry_cfg=str,
    gate_cfg=str,
    challenger_alias=str,
):
    """The run form laid over the compiled profile, validated; each stage's own section as JSON."""
    form = dict(locals())  # first: exactly the parameters
    from typing import NamedTuple

    from pipelines.run_form import SECTION_OUTPUTS, resolve

    profile, overrides, root = form.pop("profile_json"), form.pop("config_overrides"), form.pop("pipeline_root")
    cfg = resolve(profile, form, overrides, root)  # a wrong value fails here, before any GPU pod is scheduled
    out = {output: getattr(cfg, section).to_json() for output, section in SECTION_OUTPUTS.items()}
    sections = NamedTuple("Sections", [(name, str) for name in [*out, "challenger_alias"]])
    return sections(**out, challenger_alias=cfg.gate.alias_on_pass)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def base_model(model_cfg: str, model: Output[Model], metrics: Output[Metrics]):
    """Resolve the base model into a 16-bit safetensors directory (cached by content hash)."""
    import time

    from components.config import ModelSection
    from components.stages import base_model as stage
    from pipelines.kfp_io import publish

    started = time.time()
    meta = stage.run(ModelSection.model_validate_json(model_cfg), model.path)
    publish(metrics, {"parameters": meta["parameters"]}, model.path, "base_model", started)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def prepare_data(data_cfg: str, base_model: Input[Model], dataset: Output[Dataset], metrics: Output[Metrics]):
    """Validate, de-duplicate, split and render the data set; rejects are written out and counted."""
    import time

    from components.config import DataSection
    from components.stages import prepare_data as stage
    from pipelines.kfp_io import publish

    started = time.time()
    stats = stage.run(DataSection.model_validate_json(data_cfg), base_model.path, dataset.path)
    publish(metrics, stats, dataset.path, "prepare_data", started)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train(
    train_cfg: str,
    base_model: Input[Model],
    dataset: Input[Dataset],
    adapter: Output[Model],
    metrics: Output[Metrics],
    placement_json: str = "{}",
    accelerator_type: str = "nvidia.com/gpu",
):
    """QLoRA training; resumes from the last complete checkpoint of the same inputs. With train.launcher=trainjob
    it submits the stage to Kubeflow Trainer instead (pipelines/trainjob.py) and waits for it."""
    import json
    import time

    from components.config import TrainSection
    from components.stages import train as stage
    from pipelines.kfp_io import publish

    started, cfg = time.time(), TrainSection.model_validate_json(train_cfg)
    if cfg.launcher == "trainjob":
        from components.environment import TASK_SECRETS
        from pipelines import trainjob
        from pipelines.images import GPU_IMAGE

        placement = json.loads(placement_json)
        result = trainjob.run(
            cfg, base_model.path, dataset.path, adapter.path, inputs=f"{base_model.uri}\n{dataset.uri}",
            image=GPU_IMAGE, secrets=TASK_SECRETS, node_selector=placement.get("node_selector"),
            tolerations=placement.get("tolerations"), accelerator_type=accelerator_type,
        )  # fmt: skip
    else:
        result = stage.run(cfg, base_model.path, dataset.path, adapter.path)
    publish(metrics, result, adapter.path, "train", started)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate(
    eval_cfg: str,
    base_model: Input[Model],
    adapter: Input[Model],
    dataset: Input[Dataset],
    report: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
):
    """Batched greedy evaluation of the base and the tuned model on the eval split."""
    import time

    from components.config import EvalSection
    from components.stages import evaluate as stage
    from pipelines.kfp_io import publish, publish_confusion

    started = time.time()
    result = stage.run(
        EvalSection.model_validate_json(eval_cfg), base_model.path, adapter.path, dataset.path, report.path
    )
    publish(metrics, {"base": result["base"], "tuned": result["tuned"]}, report.path, "evaluate", started)
    publish_confusion(confusion, result)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def merge(
    merge_cfg: str,
    base_model: Input[Model],
    adapter: Input[Model],
    dataset: Input[Dataset],
    merged: Output[Model],
    metrics: Output[Metrics],
):
    """Merge the adapter into a 16-bit copy of the base it trained on (NF4 dequantized for QLoRA); check parity."""
    import time

    from components.config import MergeSection
    from components.stages import merge as stage
    from pipelines.kfp_io import publish

    started = time.time()
    result = stage.run(
        MergeSection.model_validate_json(merge_cfg), base_model.path, adapter.path, dataset.path, merged.path
    )
    publish(metrics, result, merged.path, "merge", started)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def quantize(
    quantize_cfg: str, merged: Input[Model], dataset: Input[Dataset], quantized: Output[Model], metrics: Output[Metrics]
):
    """int8 and NF4 variants: size, memory, accuracy and perplexity deltas, recommended TGI flag."""
    import time

    from components.artifacts import MergedModel
    from components.config import QuantizeSection
    from components.stages import quantize as stage
    from pipelines.kfp_io import publish

    started = time.time()
    merged_dir = MergedModel(merged.path).model_dir
    result = stage.run(QuantizeSection.model_validate_json(quantize_cfg), merged_dir, dataset.path, quantized.path)
    publish(metrics, result["results"], quantized.path, "quantize", started)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(
    registry_cfg: str,
    pipeline_run: str,
    base_model: Input[Model],
    dataset: Input[Dataset],
    adapter: Input[Model],
    report: Input[Artifact],
    merged: Input[Model],
    quantized: Input[Model],
    registration: Output[Artifact],
):
    """Create the MLflow model version with lineage tags (idempotent per pipeline run)."""
    import json
    from pathlib import Path

    from components.config import RegistrySection
    from components.stages import register as stage
    from pipelines.kfp_io import stage_timings

    paths = {
        "base": base_model.path,
        "data": dataset.path,
        "train": adapter.path,
        "eval": report.path,
        "merged": merged.path,
        "quantize": quantized.path,
    }
    result = stage.run(RegistrySection.model_validate_json(registry_cfg), paths, pipeline_run)
    result["stages"] = stage_timings(paths, Path(registration.path).resolve().parent.parent)
    registration.metadata.update({"name": result["name"], "version": result["version"]})
    Path(registration.path).write_text(json.dumps(result, indent=2))
    stage.record_summary(result)  # for the exit task, which cannot take this step's outputs as inputs


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def gate(
    gate_cfg: str,
    registration: Input[Artifact],
    report: Input[Artifact],
    dataset: Input[Dataset],
    verdict: Output[Metrics],
) -> bool:
    """Compare the candidate with the base and the current champion; tag the version with the verdict."""
    import json
    from pathlib import Path

    from components.config import GateSection
    from components.stages import gate as stage

    result = stage.run(
        GateSection.model_validate_json(gate_cfg),
        json.loads(Path(registration.path).read_text()),
        Path(report.path),
        dataset.path,
    )
    for key in ("gain_over_base", "gain_over_champion"):
        if result[key] is not None and result[key] == result[key]:  # not NaN
            verdict.log_metric(key, result[key])
    Path(verdict.path).write_text(json.dumps(verdict.metadata))
    return bool(result["passed"])


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def set_alias(alias: str, registration: Input[Artifact]):
    """Point the alias at the registered version (the gate passed)."""
    import json
    from pathlib import Path

    from components.stages.gate import set_alias as stage

    info = json.loads(Path(registration.path).read_text())
    stage(info["name"], info["version"], alias)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def finalize(
    profile_json: str,
    registered_model_name: str,
    config_overrides: str,
    pipeline_run: str,
    status: dsl.PipelineTaskFinalStatus,
    summary: Output[Artifact],
):
    """Exit task: mark this run's unfinished MLflow runs FAILED, drop incomplete versions, publish the summary.

    kfp lets an exit task depend on no other task, so it resolves the registry section itself."""
    import json
    from pathlib import Path

    from components.stages import register as stage
    from pipelines.run_form import resolve

    form = {"registered_model_name": registered_model_name}
    result = stage.finalize(resolve(profile_json, form, config_overrides).registry, pipeline_run, status.state)
    Path(summary.path).write_text(json.dumps(result, indent=2))
