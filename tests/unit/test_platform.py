"""The compiled pipeline carries the cluster placement that kfp.local ignores."""

import pytest
import yaml

from pipelines.config import load_config
from pipelines.finetune import compile_pipeline
from pipelines.platform import SECRETS

pytestmark = pytest.mark.unit
GPU_STAGES = ("train", "evaluate", "merge", "quantize")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "finetune.yaml"
    compile_pipeline(load_config("cluster"), str(path))
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"], path.read_text()


@pytest.mark.parametrize("stage", GPU_STAGES)
def test_each_gpu_stage_is_placed_the_same_way(compiled, stage):
    spec, k8s, _ = compiled
    container = spec["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]
    assert "llmops-gpu:" in container["image"]
    accel = container["resources"]["accelerator"]
    assert "accelerator_type" in accel["resourceType"] and "accelerator_count" in accel["resourceCount"]
    placed = k8s[f"exec-{stage}"]
    assert placed["nodeSelector"] == {
        "nodeSelectorJson": {"runtimeValue": {"constant": {"nvidia.com/gpu.present": "true"}}}
    }
    assert placed["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    assert placed["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "8Gi", "volumeName": "dshm"}
    ]
    assert {s["secretName"] for s in placed["secretAsEnv"]} == set(SECRETS)
    assert placed["podMetadata"]["labels"] == {"llmops.io/role": "pipeline"}  # what the NetworkPolicies admit


def test_cpu_stages_get_secrets_but_no_gpu(compiled):
    spec, k8s, _ = compiled
    for stage in ("resolve-config", "base-model", "prepare-data", "register", "gate"):
        container = spec["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]
        assert "llmops-cpu:" in container["image"] and "accelerator" not in container["resources"]
        assert "nodeSelector" not in k8s[f"exec-{stage}"] and k8s[f"exec-{stage}"]["secretAsEnv"]


def test_the_accelerator_is_a_pipeline_parameter_placement_comes_from_the_profile_and_train_retries(compiled):
    spec, _, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["accelerator_type"]["defaultValue"] == "nvidia.com/gpu"
    assert params["accelerator_count"]["parameterType"] == "NUMBER_INTEGER"
    assert "node_selector_json" not in params and "tolerations_json" not in params  # a cluster's, not a run's
    assert spec["root"]["dag"]["tasks"]["train"]["retryPolicy"]["maxRetryCount"] == 3
    assert (
        spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]["register"]["cachingOptions"] == {}
    )  # inside the exit handler


def test_no_secret_value_in_the_yaml(compiled):
    spec, k8s, _ = compiled
    secret_envs = {env for keys in SECRETS.values() for env in keys.values()}
    for executor in spec["deploymentSpec"]["executors"].values():
        set_here = {env["name"] for env in executor["container"].get("env", [])}
        assert not set_here & secret_envs  # credentials come from Secrets at run time, never from the YAML
    refs = [ref for placed in k8s.values() for ref in placed.get("secretAsEnv", [])]
    assert refs and all(set(ref) <= {"keyToEnv", "optional", "secretName", "secretNameParameter"} for ref in refs)


def test_every_task_requests_what_it_may_use_so_its_pod_is_guaranteed(compiled):
    from pipelines.config import TASK_RESOURCES
    from pipelines.finetune import TASK_NAMES

    spec, _, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert set(TASK_NAMES) == set(TASK_RESOURCES) == {name.removeprefix("exec-") for name in executors}
    for name, sizes in TASK_RESOURCES.items():
        resources = executors[f"exec-{name}"]["container"]["resources"]
        assert resources["resourceCpuRequest"] == resources["resourceCpuLimit"] == sizes["cpu"]
        assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"] == sizes["memory"]


def test_the_cluster_profile_resumes_training_from_checkpoints_under_the_pipeline_root(compiled):
    from pipelines.run_form import checkpoint_root_under, form_values, resolve

    spec, _, _ = compiled
    inputs = spec["root"]["dag"]["tasks"]["resolve-config"]["inputs"]["parameters"]
    assert inputs["pipeline_root"] == {"runtimeValue": {"constant": "{{$.pipeline_root}}"}}
    cluster = load_config("cluster")
    cfg = resolve(cluster.model_dump_json(), form_values(cluster), "", "minio://mlpipeline/v2/artifacts/")
    assert cfg.train.checkpoint_root == "s3://mlpipeline/v2/artifacts/llmops-checkpoints"
    assert checkpoint_root_under("s3://bucket/root") == "s3://bucket/root/llmops-checkpoints"
    assert checkpoint_root_under("/tmp/kfp-local") is None  # a laptop keeps the stage's own default
    chosen = resolve(cluster.model_dump_json(), form_values(cluster), "train.checkpoint_root=/pvc/ckpt", "s3://b/r")
    assert chosen.train.checkpoint_root == "/pvc/ckpt"  # a chosen root wins
    assert "llmops-hf" in {s["secretName"] for s in compiled[1]["exec-base-model"]["secretAsEnv"]}  # gated models
