"""The `finetune` kfp v2 pipeline: base model → data → train → evaluate → merge → quantize → register.

The run form is the dozen knobs people change per run, flat and typed, plus `config_overrides` for every other
field (pipelines/run_form.py); the defaults are the chosen profile's values, so the Kubeflow UI shows what
`llmops run` would use. Descriptions are the fields' own (`Field(description=...)`). The first task resolves
and validates the whole config and hands each stage only its own section.
"""

import json

from kfp import dsl

from pipelines import platform, steps
from pipelines.code_digest import ENV as CODE_DIGEST_ENV
from pipelines.code_digest import task_digest
from pipelines.config import PipelineConfig
from pipelines.run_form import FORM, OVERRIDES_HELP, describe_parameter, form_values

PIPELINE_NAME = "finetune"
# Tasks kfp may take from its cache; resolve, register, gate, the alias step and finalize always run.
CACHED_TASKS = ("base-model", "prepare-data", "train", "evaluate", "merge", "quantize")
# The component behind each task, in the order build_pipeline lists its tasks.
COMPONENTS = (
    steps.resolve_config,
    steps.base_model,
    steps.prepare_data,
    steps.train,
    steps.evaluate,
    steps.merge,
    steps.quantize,
    steps.register,
    steps.gate,
    steps.set_alias,
    steps.finalize,
)
TASK_NAMES = tuple(component.name for component in COMPONENTS)  # kfp names a task after its component


def build_pipeline(cfg: PipelineConfig):
    """A `finetune` pipeline whose run form defaults to cfg's values (see pipelines/run_form.py)."""
    form, profile_json = form_values(cfg), cfg.model_dump_json()

    def finetune(
        base_model: str = form["base_model"],
        data_uri: str = form["data_uri"],
        data_format: str = form["data_format"],
        label_field: str = form["label_field"],
        registered_model_name: str = form["registered_model_name"],
        max_steps: int = form["max_steps"],
        learning_rate: float = form["learning_rate"],
        batch_size: int = form["batch_size"],
        lora_rank: int = form["lora_rank"],
        eval_examples: int = form["eval_examples"],
        gate_min_gain: float = form["gate_min_gain"],
        accelerator_type: str = form["accelerator_type"],
        accelerator_count: int = form["accelerator_count"],
        config_overrides: str = "",
    ) -> dsl.Artifact:
        form_arguments = {name: value for name, value in locals().items() if name in FORM}  # as passed to the run
        resolved = steps.resolve_config(
            profile_json=profile_json,
            config_overrides=config_overrides,
            pipeline_root=dsl.PIPELINE_ROOT_PLACEHOLDER,
            **form_arguments,
        ).set_display_name("resolve config")
        resolved.set_caching_options(False)  # a second of work; the stages after it cache on their own sections
        sections = resolved.outputs
        base, data, trained, evaluated, merged, quantized = _model_stages(sections, cfg, accelerator_type)
        on_trainer = cfg.train.launcher == "trainjob"  # the train task submits a TrainJob: it holds no GPU
        for task in (evaluated, merged, quantized) if on_trainer else (trained, evaluated, merged, quantized):
            platform.on_gpu(
                task, accelerator_type, accelerator_count, cfg.placement.node_selector, cfg.placement.tolerations
            )
        if on_trainer:
            platform.launches_trainjobs(trained)
        platform.retry_training(trained)
        # The exit task runs however the registry stages end (it closes what a killed register left open and
        # deletes a half-made version). The model stages stay outside: kfp 2.17 does not wire the placement
        # parameters (set_accelerator_type) into an ExitHandler's sub-DAG, and they touch no registry.
        # kfp forbids pipeline outputs from inside the handler, so the exit task publishes the summary.
        final = steps.finalize(
            profile_json=profile_json,
            registered_model_name=registered_model_name,
            config_overrides=config_overrides,
            pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        )
        final.set_display_name("finalize").set_caching_options(False)
        with dsl.ExitHandler(final, name="registry"):
            registry = _registry_stages(sections, base, data, trained, evaluated, merged, quantized)
        tasks = [resolved, base, data, trained, evaluated, merged, quantized, *registry, final]
        for task in [resolved, base, data, *registry, final]:
            platform.with_secrets(task)
        for task, name in zip(tasks, TASK_NAMES):
            platform.sized(task, cfg.placement.resources, name)
        for task, component in zip(tasks, COMPONENTS):
            task.set_env_variable(CODE_DIGEST_ENV, task_digest(component))  # this task's code only: see code_digest
        return final.outputs["summary"]

    finetune.__doc__ = parameter_docs()  # kfp reads each parameter's description from the Args section
    return dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)(finetune)


DESCRIPTION = "QLoRA fine-tuning of a Llama-family model, from data to a registered MLflow model version."


def parameter_docs() -> str:
    """The pipeline's docstring: each form parameter described by its config field's own description."""
    lines = [DESCRIPTION, "", "Args:"]
    lines += [f"    {parameter}: {describe_parameter(parameter)}" for parameter in FORM]
    lines.append(f"    config_overrides: {OVERRIDES_HELP}")
    return "\n".join(lines)


def _model_stages(sections, cfg: PipelineConfig, accelerator_type):
    base = steps.base_model(model_cfg=sections["model_cfg"]).set_display_name("base model")
    data = steps.prepare_data(data_cfg=sections["data_cfg"], base_model=base.outputs["model"]).set_display_name(
        "prepare data"
    )
    placement = {"node_selector": cfg.placement.node_selector, "tolerations": cfg.placement.tolerations}
    trained = steps.train(
        train_cfg=sections["train_cfg"],
        base_model=base.outputs["model"],
        dataset=data.outputs["dataset"],
        placement_json=json.dumps(placement),  # a TrainJob's nodes go where the GPU stages go
        accelerator_type=accelerator_type,  # and request the run form's GPU resource
    ).set_display_name("train (QLoRA)")
    evaluated = steps.evaluate(
        eval_cfg=sections["eval_cfg"],
        base_model=base.outputs["model"],
        adapter=trained.outputs["adapter"],
        dataset=data.outputs["dataset"],
    ).set_display_name("evaluate")
    merged = steps.merge(
        merge_cfg=sections["merge_cfg"],
        base_model=base.outputs["model"],
        adapter=trained.outputs["adapter"],
        dataset=data.outputs["dataset"],
    ).set_display_name("merge")
    merged.after(evaluated)  # no data dependency, but a model that failed evaluation is not worth merging
    quantized = steps.quantize(
        quantize_cfg=sections["quantize_cfg"], merged=merged.outputs["merged"], dataset=data.outputs["dataset"]
    ).set_display_name("quantize")
    return base, data, trained, evaluated, merged, quantized


def _registry_stages(sections, base, data, trained, evaluated, merged, quantized):
    registered = steps.register(
        registry_cfg=sections["registry_cfg"],
        pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        base_model=base.outputs["model"],
        dataset=data.outputs["dataset"],
        adapter=trained.outputs["adapter"],
        report=evaluated.outputs["report"],
        merged=merged.outputs["merged"],
        quantized=quantized.outputs["quantized"],
    ).set_display_name("register")
    registered.set_caching_options(False)  # a new pipeline run always gets its own version
    gated = steps.gate(
        gate_cfg=sections["gate_cfg"],
        registration=registered.outputs["registration"],
        report=evaluated.outputs["report"],
        dataset=data.outputs["dataset"],
    ).set_display_name("gate")
    gated.set_caching_options(False)  # the champion it compares against lives in the registry, not the inputs
    with dsl.If(gated.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (kfp needs ==)
        aliased = steps.set_alias(alias=sections["challenger_alias"], registration=registered.outputs["registration"])
        aliased.set_display_name("set challenger alias").set_caching_options(False)
    return [registered, gated, aliased]


def compile_pipeline(cfg: PipelineConfig, out_path: str) -> str:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(cfg), package_path=out_path)
    return out_path
