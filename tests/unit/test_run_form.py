"""The Kubeflow run form (pipelines/run_form.py): flat typed knobs and config_overrides over the compiled profile."""

import pytest
import yaml

from pipelines.config import load_config
from pipelines.run_form import FORM, form_values, resolve

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def cluster():
    return load_config("cluster")


def test_the_untouched_form_resolves_to_the_profile(cluster):
    """With one thing filled in: training's process count, from the GPUs the run requests."""
    one_per_gpu = cluster.train.model_copy(update={"num_processes": cluster.placement.accelerator_count})
    assert resolve(cluster.model_dump_json(), form_values(cluster)) == cluster.model_copy(update={"train": one_per_gpu})


def test_form_parameters_set_their_fields(cluster):
    form = form_values(cluster) | {"max_steps": 7, "data_uri": "s3://bucket/tickets.jsonl", "label_field": "intent"}
    cfg = resolve(cluster.model_dump_json(), form)
    assert (cfg.train.max_steps, cfg.data.path, cfg.data.label_field) == (7, "s3://bucket/tickets.jsonl", "intent")
    assert resolve(cluster.model_dump_json(), form | {"label_field": ""}).data.label_field is None


@pytest.mark.parametrize(
    "overrides",
    [
        "train:\n  warmup_ratio: 0.2\nquantize:\n  max_accuracy_drop: 0.03\n",
        "train.warmup_ratio: 0.2\nquantize.max_accuracy_drop: 0.03\n",
        "train.warmup_ratio=0.2\n# a comment\nquantize.max_accuracy_drop=0.03\n",
    ],
    ids=["nested YAML", "dotted YAML", "key=value lines"],
)
def test_config_overrides_reach_deep_fields_of_the_stage_sections(cluster, overrides):
    cfg = resolve(cluster.model_dump_json(), form_values(cluster), overrides)
    assert cfg.train.warmup_ratio == 0.2 and cfg.quantize.max_accuracy_drop == 0.03
    assert cfg.train.max_steps == cluster.train.max_steps  # the rest of the section is kept


@pytest.mark.parametrize(
    ("change", "overrides", "expected"),
    [
        ({"data_format": "xls"}, "", "data_format (data.format): Input should be 'auto', 'alpaca', 'chat' or 'label'"),
        ({"max_steps": 0}, "", "max_steps (train.max_steps): Input should be greater than 0. Given: 0"),
        ({"accelerator_count": -1}, "", "accelerator_count (placement.accelerator_count): Input should be greater"),
        ({}, "train.warmup=0.1", "config_overrides: train.warmup: Extra inputs are not permitted"),
        ({}, "train: [1, 2]", "config_overrides: train: Input should be a valid dictionary"),
        ({}, "- just a list", "config_overrides: expected a mapping or key=value lines"),
        ({}, "placement.resources.train.memory=64Gi", "placement.resources shape the pods and are compiled in"),
    ],
)
def test_a_wrong_value_names_the_parameter_and_what_it_accepts(cluster, change, overrides, expected):
    with pytest.raises(ValueError, match="^") as err:
        resolve(cluster.model_dump_json(), form_values(cluster) | change, overrides)
    assert expected in str(err.value)


def test_every_stage_takes_its_section_from_the_resolve_task(tmp_path, cluster):
    """So a wrong value fails `resolve config` before any stage (and any GPU pod) starts."""
    from pipelines.finetune import compile_pipeline

    spec = next(yaml.safe_load_all(open(compile_pipeline(cluster, str(tmp_path / "f.yaml")))))
    tasks = {**spec["root"]["dag"]["tasks"], **spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]}
    for task, section in [("base-model", "model_cfg"), ("train", "train_cfg"), ("gate", "gate_cfg")]:
        source = tasks[task]["inputs"]["parameters"][section]
        assert source in (  # directly, or inside the exit handler through the handler's input
            {"taskOutputParameter": {"outputParameterKey": section, "producerTask": "resolve-config"}},
            {"componentInputParameter": f"pipelinechannel--resolve-config-{section}"},
        )
    assert set(FORM) <= set(tasks["resolve-config"]["inputs"]["parameters"])


def test_the_gpus_a_run_requests_set_its_training_processes_unless_the_config_gives_them(cluster):
    """Four GPUs on the form, four torchrun workers (one per GPU); a count in the profile or the overrides is kept,
    and a CPU run stays one process."""
    assert cluster.train.use_gpu and cluster.train.num_processes is None
    profile, form = cluster.model_dump_json(), form_values(cluster)
    assert resolve(profile, form | {"accelerator_count": 4}).train.per_node == 4
    assert resolve(profile, form | {"accelerator_count": 4}, "train.num_processes=1").train.per_node == 1
    assert resolve(profile, form | {"accelerator_count": 4}, "train.use_gpu=false").train.per_node == 1
    sharded = resolve(profile, form | {"accelerator_count": 2}, "train.strategy=fsdp").train
    assert (sharded.parallelism, sharded.processes) == ("fsdp", 2)
    with pytest.raises(ValueError, match="train.strategy=fsdp needs train.num_processes"):
        resolve(profile, form | {"accelerator_count": 1}, "train.strategy=fsdp")
