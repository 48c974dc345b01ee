"""The `finetune` kfp v2 pipeline: base model → data → train → evaluate → merge → quantize → register.

Parameters are the config sections as JSON, with the chosen profile's values as defaults, so the
Kubeflow UI shows (and lets a user edit) exactly what `llmops run` would use. Their descriptions are
the fields' own (`Field(description=...)` in components/config.py and pipelines/config.py).
"""

from kfp import dsl

from components.config import describe
from pipelines import platform, steps
from pipelines.code_digest import ENV as CODE_DIGEST_ENV
from pipelines.code_digest import task_digest
from pipelines.config import PipelineConfig

PIPELINE_NAME = "finetune"
# Tasks kfp may take from its cache; register, gate, the alias step and finalize always run.
CACHED_TASKS = ("base-model", "prepare-data", "train", "evaluate", "merge", "quantize")
# The component behind each task, in the order build_pipeline lists its tasks.
COMPONENTS = (
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


def build_pipeline(cfg: PipelineConfig):
    """A `finetune` pipeline whose parameter defaults come from cfg."""

    def finetune(
        model_cfg: str = cfg.model.to_json(),
        data_cfg: str = cfg.data.to_json(),
        train_cfg: str = cfg.train.to_json(),
        eval_cfg: str = cfg.eval.to_json(),
        merge_cfg: str = cfg.merge.to_json(),
        quantize_cfg: str = cfg.quantize.to_json(),
        register_cfg: str = cfg.registry.to_json(),
        gate_cfg: str = cfg.gate.to_json(),
        challenger_alias: str = cfg.gate.alias_on_pass,
        accelerator_type: str = cfg.placement.accelerator_type,
        accelerator_count: str = str(cfg.placement.accelerator_count),
        node_selector_json: dict = dict(cfg.placement.node_selector),
        tolerations_json: list = list(cfg.placement.tolerations),
    ) -> dsl.Artifact:
        base, data, trained, evaluated, merged, quantized = _model_stages(
            model_cfg, data_cfg, train_cfg, eval_cfg, merge_cfg, quantize_cfg
        )
        for task in (trained, evaluated, merged, quantized):
            platform.on_gpu(task, accelerator_type, accelerator_count, node_selector_json, tolerations_json)
        platform.retry_training(trained)
        # The exit task runs however the registry stages end (it closes what a killed register left open and
        # deletes a half-made version). The model stages stay outside: kfp 2.17 does not wire the placement
        # parameters (set_accelerator_type) into an ExitHandler's sub-DAG, and they touch no registry.
        # kfp forbids pipeline outputs from inside the handler, so the exit task publishes the summary.
        final = steps.finalize(register_cfg=register_cfg, pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
        final.set_display_name("finalize").set_caching_options(False)
        with dsl.ExitHandler(final, name="registry"):
            registry = _registry_stages(
                register_cfg, gate_cfg, challenger_alias, base, data, trained, evaluated, merged, quantized
            )
        tasks = [base, data, trained, evaluated, merged, quantized, *registry, final]
        for task in [base, data, *registry, final]:
            platform.with_secrets(task)
        for task, component in zip(tasks, COMPONENTS):
            task.set_env_variable(CODE_DIGEST_ENV, task_digest(component))  # this task's code only: see code_digest
        return final.outputs["summary"]

    finetune.__doc__ = parameter_docs(cfg)  # kfp reads each parameter's description from the Args section
    return dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)(finetune)


DESCRIPTION = "QLoRA fine-tuning of a Llama-family model, from data to a registered MLflow model version."
# The parameters that are whole config sections, as JSON, and the section each one carries.
SECTION_PARAMETERS = {
    "model_cfg": "model",
    "data_cfg": "data",
    "train_cfg": "train",
    "eval_cfg": "eval",
    "merge_cfg": "merge",
    "quantize_cfg": "quantize",
    "register_cfg": "registry",
    "gate_cfg": "gate",
}
PLACEMENT_PARAMETERS = {
    "accelerator_type": "accelerator_type",
    "accelerator_count": "accelerator_count",
    "node_selector_json": "node_selector",
    "tolerations_json": "tolerations",
}


def parameter_docs(cfg: PipelineConfig) -> str:
    """The pipeline's docstring: each parameter described by the config fields' own descriptions."""
    fields = PipelineConfig.model_fields
    lines = [DESCRIPTION, "", "Args:"]
    for parameter, section in SECTION_PARAMETERS.items():
        kind = fields[section].annotation
        keys = "; ".join(f"{key.split('.', 1)[1]}: {meaning}" for key, _, _, meaning in describe(kind, f"{section}."))
        lines.append(f"    {parameter}: JSON of the {section} section ({kind.__doc__.strip()}) {keys}")
    lines.append(f"    challenger_alias: {fields['gate'].annotation.model_fields['alias_on_pass'].description}")
    placement = fields["placement"].annotation.model_fields
    for parameter, field in PLACEMENT_PARAMETERS.items():
        lines.append(f"    {parameter}: {placement[field].description}")
    return "\n".join(lines)


def _model_stages(model_cfg, data_cfg, train_cfg, eval_cfg, merge_cfg, quantize_cfg):
    base = steps.base_model(model_cfg=model_cfg).set_display_name("base model")
    data = steps.prepare_data(data_cfg=data_cfg, base_model=base.outputs["model"]).set_display_name("prepare data")
    trained = steps.train(
        train_cfg=train_cfg, base_model=base.outputs["model"], dataset=data.outputs["dataset"]
    ).set_display_name("train (QLoRA)")
    evaluated = steps.evaluate(
        eval_cfg=eval_cfg,
        base_model=base.outputs["model"],
        adapter=trained.outputs["adapter"],
        dataset=data.outputs["dataset"],
    ).set_display_name("evaluate")
    merged = steps.merge(
        merge_cfg=merge_cfg,
        base_model=base.outputs["model"],
        adapter=trained.outputs["adapter"],
        dataset=data.outputs["dataset"],
    ).set_display_name("merge")
    merged.after(evaluated)  # no data dependency, but a model that failed evaluation is not worth merging
    quantized = steps.quantize(
        quantize_cfg=quantize_cfg, merged=merged.outputs["merged"], dataset=data.outputs["dataset"]
    ).set_display_name("quantize")
    return base, data, trained, evaluated, merged, quantized


def _registry_stages(register_cfg, gate_cfg, challenger_alias, base, data, trained, evaluated, merged, quantized):
    registered = steps.register(
        register_cfg=register_cfg,
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
        gate_cfg=gate_cfg,
        registration=registered.outputs["registration"],
        report=evaluated.outputs["report"],
        dataset=data.outputs["dataset"],
    ).set_display_name("gate")
    gated.set_caching_options(False)  # the champion it compares against lives in the registry, not the inputs
    with dsl.If(gated.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (kfp needs ==)
        aliased = steps.set_alias(alias=challenger_alias, registration=registered.outputs["registration"])
        aliased.set_display_name("set challenger alias").set_caching_options(False)
    return [registered, gated, aliased]


def compile_pipeline(cfg: PipelineConfig, out_path: str) -> str:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(cfg), package_path=out_path)
    return out_path
