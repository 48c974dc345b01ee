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
    assert placed["nodeSelector"] == {"nodeSelectorJson": {"componentInputParameter": "node_selector_json"}}
    assert placed["tolerations"] == [{"tolerationJson": {"componentInputParameter": "tolerations_json"}}]
    assert placed["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "8Gi", "volumeName": "dshm"}
    ]
    assert {s["secretName"] for s in placed["secretAsEnv"]} == set(SECRETS)
    assert placed["podMetadata"]["labels"] == {"llmops.io/role": "pipeline"}  # what the NetworkPolicies admit


def test_cpu_stages_get_secrets_but_no_gpu(compiled):
    spec, k8s, _ = compiled
    for stage in ("base-model", "prepare-data", "register", "gate"):
        container = spec["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]
        assert "llmops-cpu:" in container["image"] and "resources" not in container
        assert "nodeSelector" not in k8s[f"exec-{stage}"] and k8s[f"exec-{stage}"]["secretAsEnv"]


def test_placement_is_a_pipeline_parameter_and_train_retries(compiled):
    spec, _, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["node_selector_json"]["parameterType"] == "STRUCT"
    assert params["tolerations_json"]["defaultValue"][0]["key"] == "nvidia.com/gpu"
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
