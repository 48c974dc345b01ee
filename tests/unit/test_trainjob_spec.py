"""The TrainJob the train task renders for Kubeflow Trainer: valid against Trainer's own CRD schema, and saying what
the stage needs (image, command, nodes, processes, GPUs, Secrets, placement, checkpoint root)."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from components.config import TrainSection
from components.environment import TASK_SECRETS
from pipelines import trainjob

pytestmark = pytest.mark.unit
# Vendored from kubeflow/trainer v2.3.0 (its source, tag and commit are in the file), descriptions removed.
VENDORED = json.loads(
    (Path(__file__).parents[1] / "fixtures" / "trainer" / "trainjob-v1alpha1.schema.json").read_text()
)
ROOT = "s3://checkpoints/llmops"


def rendered(accelerator_type: str = "nvidia.com/gpu", **changes) -> dict:
    settings = {"launcher": "trainjob", "nodes": 2, "num_processes": 4, "use_gpu": True, "checkpoint_root": ROOT}
    cfg = TrainSection(**{**settings, **changes})
    return trainjob.render(
        cfg,
        name="llmops-train-0123456789abcdef",
        namespace="team-a",
        image="ghcr.io/llmops/llmops-gpu:0.1.0",
        base_uri=f"{ROOT}/trainjobs/x/inputs/base",
        data_uri=f"{ROOT}/trainjobs/x/inputs/data",
        secrets=TASK_SECRETS,
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        accelerator_type=accelerator_type,
    )


def test_the_rendered_trainjob_passes_trainers_crd_schema_and_a_broken_one_does_not():
    assert VENDORED["tag"] == "v2.3.0" and VENDORED["version"] == trainjob.VERSION
    validator = jsonschema.Draft7Validator(VENDORED["schema"])
    job = rendered()
    assert not [e.message for e in validator.iter_errors(job)]
    broken = json.loads(json.dumps(job))
    broken["spec"]["trainer"]["numNodes"] = "2"  # a string where Trainer wants an int32
    broken["spec"]["runtimePatches"][0].pop("manager")  # each patch must name its manager
    errors = sorted(e.message for e in validator.iter_errors(broken))
    assert errors == ["'2' is not of type 'integer'", "'manager' is a required property"]


def test_the_trainjob_runs_the_stage_on_every_node_with_its_gpus_secrets_and_placement():
    job = rendered()
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["namespace"] == "team-a"
    assert job["spec"]["runtimeRef"] == {
        "name": "torch-distributed",
        "kind": "ClusterTrainingRuntime",
        "apiGroup": "trainer.kubeflow.org",
    }
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == "ghcr.io/llmops/llmops-gpu:0.1.0"
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4"}
    # placement.accelerator_type reaches the nodes, as it does the pipeline's own GPU tasks
    amd = rendered(accelerator_type="amd.com/gpu")["spec"]["trainer"]["resourcesPerNode"]
    assert amd == {"limits": {"amd.com/gpu": "4"}, "requests": {"amd.com/gpu": "4"}}
    command = trainer["command"]
    assert command[:3] == ["python", "-m", "pipelines.trainjob_node"]
    cfg = TrainSection.model_validate_json(command[3])  # the stage's own section, whole
    assert (cfg.nodes, cfg.num_processes, cfg.checkpoint_root) == (2, 4, ROOT)
    assert command[4:] == [
        f"{ROOT}/trainjobs/x/inputs/base",
        f"{ROOT}/trainjobs/x/inputs/data",
        f"{ROOT}/trainjobs/llmops-train-0123456789abcdef/adapter",
    ]
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in trainer["env"] if "valueFrom" in e}
    assert secret_env == {var: name for name, keys in TASK_SECRETS.items() for var in keys.values()}
    assert not any("value" in e and "SECRET" in e["name"] for e in trainer["env"])  # names, never values
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == "node"
    spec = pod["template"]["spec"]["template"]["spec"]
    assert (
        spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    )
    assert spec["containers"] == [{"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]


def test_a_trainjob_needs_a_shared_checkpoint_root_and_nodes_need_the_trainjob_launcher(monkeypatch):
    monkeypatch.delenv("LLMOPS_CHECKPOINT_ROOT", raising=False)
    with pytest.raises(ValueError, match="needs an s3:// checkpoint root that every node reaches"):
        rendered(checkpoint_root="/mnt/checkpoints")
    with pytest.raises(ValueError, match="compile the pipeline with train.launcher=trainjob"):
        TrainSection(nodes=2)
    monkeypatch.setenv("LLMOPS_CHECKPOINT_ROOT", "s3://from-the-environment")
    assert (
        trainjob.output_uri(TrainSection(launcher="trainjob"), "j") == "s3://from-the-environment/trainjobs/j/adapter"
    )


def test_the_job_name_follows_config_inputs_and_code(monkeypatch):
    cfg = TrainSection(launcher="trainjob", nodes=2)
    name = trainjob.job_name(cfg, "minio://a\nminio://b")
    assert name == trainjob.job_name(cfg, "minio://a\nminio://b") and len(name) <= 63
    assert name != trainjob.job_name(cfg.model_copy(update={"max_steps": 7}), "minio://a\nminio://b")
    assert name != trainjob.job_name(cfg, "minio://a\nminio://c")
    monkeypatch.setenv("LLMOPS_CODE_DIGEST", "other-code")
    assert name != trainjob.job_name(cfg, "minio://a\nminio://b")


@pytest.mark.parametrize(
    "conditions, state",
    [
        ([], "running"),
        ([{"type": "Suspended", "status": "True", "reason": "Suspended"}], "running"),
        ([{"type": "Complete", "status": "True", "reason": "JobSetCompleted", "message": "done"}], "complete"),
        ([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "too long"}], "failed"),
        ([{"type": "Failed", "status": "False", "reason": "x"}], "running"),
    ],
)
def test_state_of_reads_trainers_conditions(conditions, state):
    found, why = trainjob.state_of({"status": {"conditions": conditions}})
    assert found == state
    if state == "failed":
        assert why == "DeadlineExceeded: too long"


def test_the_cluster_pipeline_with_the_trainjob_launcher_gives_the_train_task_no_gpu_and_its_namespace(tmp_path):
    from pipelines.config import load_config
    from pipelines.finetune import compile_pipeline

    path = tmp_path / "finetune.yaml"
    compile_pipeline(load_config("cluster", ["train.launcher=trainjob"]), str(path))
    spec, platform = yaml.safe_load_all(path.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert "accelerator" in spec["deploymentSpec"]["executors"]["exec-evaluate"]["container"]["resources"]
    assert executors["exec-train"]["fieldPathAsEnv"] == [
        {"name": "LLMOPS_POD_NAMESPACE", "fieldPath": "metadata.namespace"}
    ]
    assert "nodeSelector" not in executors["exec-train"] and executors["exec-train"]["secretAsEnv"]
    placement = spec["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]["placement_json"]
    assert json.loads(placement["runtimeValue"]["constant"])["node_selector"] == {"nvidia.com/gpu.present": "true"}
