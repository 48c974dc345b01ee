"""TGI serving manifests: schema-valid for Kubernetes 1.30 (strict), and saying what the deploy settings say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from serving import fetch_model, manifests
from serving.settings import DeploySection

pytestmark = pytest.mark.unit

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
RBAC = ROOT / "infra" / "k8s" / "base" / "deployer-rbac.yaml"
RUN_ID = "0123456789abcdef0123456789abcdef"
SECRET_VALUE = "s3cr3t-value-never-rendered"


def tags(quantize: str = "bitsandbytes-nf4") -> dict:
    # A secret-looking tag must never leak into the manifest: only the tags we use may.
    return {"recommended_quantize": quantize, "base_model": "x", "aws_secret_access_key": SECRET_VALUE}


def deployment(cfg: DeploySection | None = None, quantize: str = "bitsandbytes-nf4", version: str = "3") -> dict:
    return manifests.render_deployment(
        cfg or DeploySection(), name="llmops-demo", version=version, run_id=RUN_ID, tags=tags(quantize)
    )


def tgi(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


def validate(obj: dict) -> None:
    try:
        kubernetes_validate.validate(obj, "1.30", strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{obj['kind']} is invalid: {exc.message} at {list(exc.absolute_path)}")


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize(
    "cfg",
    [DeploySection(), DeploySection(accelerator_count=0, node_selector={}, tolerations=[]), DeploySection(replicas=3)],
)
@pytest.mark.parametrize("quantize", ["bitsandbytes-nf4", "bitsandbytes", "none"])
def test_every_object_is_schema_valid(cfg, quantize):
    for obj in manifests.render(cfg, name="llmops-demo", version="3", run_id=RUN_ID, tags=tags(quantize)):
        validate(obj)


def test_rbac_documents_are_valid_and_the_role_lives_where_the_tgi_objects_go():
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    assert sorted(d["kind"] for d in docs) == ["Role", "RoleBinding", "ServiceAccount"]
    namespaces = {d["kind"]: d["metadata"]["namespace"] for d in docs}
    for doc in docs:
        validate(doc)
    # the identity in the infrastructure namespace, its rights only where the deployer renders
    assert namespaces == {
        "ServiceAccount": "llmops",
        "Role": DeploySection().namespace,
        "RoleBinding": "llmops-serving",
    }
    role = next(d for d in docs if d["kind"] == "Role")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "llmops-deployer"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llmops-deployer", "namespace": "llmops"}]
    # that these verbs are exactly the ones the deployer uses: tests/integration/test_kube.py


def test_tgi_args_follow_config_and_quantize_tag():
    cfg = DeploySection(max_input_tokens=1000, max_total_tokens=3000, max_batch_prefill_tokens=5000)
    args = tgi(deployment(cfg))["args"]
    assert arg(args, "--model-id") == "/data/model"
    assert arg(args, "--quantize") == "bitsandbytes-nf4"
    assert (arg(args, "--max-input-tokens"), arg(args, "--max-total-tokens")) == ("1000", "3000")
    assert arg(args, "--max-batch-prefill-tokens") == "5000"
    assert arg(args, "--port") == str(tgi(deployment())["ports"][0]["containerPort"])
    assert arg(args, "--hostname") == "0.0.0.0"
    assert arg(tgi(deployment(quantize="bitsandbytes"))["args"], "--quantize") == "bitsandbytes"
    assert "--quantize" not in tgi(deployment(quantize="none"))["args"]
    assert tgi(deployment())["image"] == DeploySection().tgi_image and "@sha256:" in tgi(deployment())["image"]


def test_unknown_quantize_tag_or_prefill_below_input_fails_at_render():
    with pytest.raises(ValueError, match="recommended_quantize"):
        deployment(quantize="gptq")
    with pytest.raises(ValueError, match="max_batch_prefill_tokens"):
        deployment(DeploySection(max_input_tokens=1024, max_batch_prefill_tokens=512))


def test_env_probes_grace_and_strategy():
    dep = deployment()
    container, pod = tgi(dep), dep["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and env["USAGE_STATS"] == "off"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= DeploySection().rollout_timeout_s
    assert pod["terminationGracePeriodSeconds"] >= 90
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert dep["spec"]["progressDeadlineSeconds"] == DeploySection().rollout_timeout_s
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["initContainers"][0]["securityContext"]["runAsNonRoot"] is True


def test_gpu_node_selector_tolerations_and_volumes():
    cfg = DeploySection(
        accelerator_type="nvidia.com/gpu",
        accelerator_count=2,
        shm_size="2Gi",
        node_selector={"pool": "a100"},
        tolerations=[{"key": "gpu", "operator": "Exists"}],
    )
    dep = deployment(cfg)
    pod, container = dep["spec"]["template"]["spec"], tgi(dep)
    amounts = {"cpu": cfg.tgi_cpu, "memory": cfg.tgi_memory, "nvidia.com/gpu": "2"}
    assert container["resources"] == {"requests": amounts, "limits": amounts}
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    assert volumes["data"]["emptyDir"] == {"sizeLimit": cfg.model_volume_size}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": cfg.tmp_size}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {"/dev/shm": "shm", "/data": "data", "/tmp": "tmp"}
    cpu = deployment(DeploySection(accelerator_count=0, node_selector={}, tolerations=[]))["spec"]["template"]["spec"]
    assert "nodeSelector" not in cpu and "tolerations" not in cpu
    assert set(cpu["containers"][0]["resources"]["limits"]) == {"cpu", "memory"}  # CPU serving: no GPU asked


def qos_class(pod: dict) -> str:
    """Kubernetes' rule: Guaranteed when every container, init containers included, has CPU and memory limits
    equal to its requests."""
    containers = pod["containers"] + pod.get("initContainers", [])
    for c in containers:
        r = c.get("resources", {})
        if not all(
            r.get("limits", {}).get(k) and r["limits"][k] == r.get("requests", {}).get(k) for k in ("cpu", "memory")
        ):
            return "Burstable" if any(c.get("resources") for c in containers) else "BestEffort"
    return "Guaranteed"


@pytest.mark.parametrize("cfg", [DeploySection(), DeploySection(accelerator_count=0, node_selector={}, tolerations=[])])
def test_the_tgi_pod_is_hardened_like_our_other_pods(cfg):
    pod = deployment(cfg)["spec"]["template"]["spec"]
    assert qos_class(pod) == "Guaranteed"
    for container in pod["containers"] + pod["initContainers"]:
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] == 1000  # the UID the README documents
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["fsGroup"] == 1000  # both containers read and write the emptyDirs
    assert all("sizeLimit" in v["emptyDir"] for v in pod["volumes"])
    assert {"name": "HOME", "value": "/tmp"} in pod["containers"][0]["env"]
    # an image that truly needs root keeps the rest of the lock-down
    rooted = deployment(DeploySection(tgi_user=None))["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert "runAsNonRoot" not in rooted and rooted["capabilities"] == {"drop": ["ALL"]}


def test_replicas_are_configurable_and_two_or_more_get_a_disruption_budget():
    single = manifests.render(DeploySection(), name="llmops-demo", version="3", run_id=RUN_ID, tags=tags())
    assert [o["kind"] for o in single] == ["Service", "Deployment"] and single[1]["spec"]["replicas"] == 1
    three = manifests.render(DeploySection(replicas=3), name="llmops-demo", version="3", run_id=RUN_ID, tags=tags())
    assert [o["kind"] for o in three] == ["Service", "PodDisruptionBudget", "Deployment"]
    budget, dep = three[1], three[2]
    assert dep["spec"]["replicas"] == 3 and budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_init_container_fetches_the_version_with_secret_refs_only():
    cfg = DeploySection(mlflow_tracking_uri="http://mlflow:5000", s3_secret="s3-creds", mlflow_secret="ml-creds")
    init = deployment(cfg, version="7")["spec"]["template"]["spec"]["initContainers"][0]
    assert init["image"] == cfg.fetch_image
    assert init["command"] == ["python", "-m", "serving.fetch_model", "models:/llmops-demo/7", "/data/model"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in init["env"]
    assert init["envFrom"] == [
        {"secretRef": {"name": "s3-creds"}},
        {"secretRef": {"name": "ml-creds", "optional": True}},
    ]
    assert {"name": "data", "mountPath": "/data"} in init["volumeMounts"]


def test_no_secret_material_in_any_manifest():
    objs = manifests.render(DeploySection(), name="llmops-demo", version="3", run_id=RUN_ID, tags=tags())
    text = json.dumps(objs)
    assert SECRET_VALUE not in text and "secretKeyRef" not in text
    for obj in objs:
        for c in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []) + obj.get(
            "spec", {}
        ).get("template", {}).get("spec", {}).get("initContainers", []):
            for e in c.get("env", []):
                assert not any(word in e["name"].upper() for word in ("SECRET", "PASSWORD", "TOKEN", "KEY"))


def test_labels_annotations_and_stable_identity():
    v3, v4 = (
        deployment(version="3"),
        manifests.render_deployment(
            DeploySection(), name="llmops-demo", version="4", run_id="f" * 32, tags=tags("none")
        ),
    )
    for meta in (v3["metadata"], v3["spec"]["template"]["metadata"]):
        assert meta["annotations"][manifests.ANN_NAME] == "llmops-demo"
        assert meta["annotations"][manifests.ANN_VERSION] == "3"
        assert meta["annotations"][manifests.ANN_RUN] == RUN_ID
        assert meta["labels"][manifests.ANN_VERSION] == "3" and meta["labels"][manifests.ANN_RUN] == RUN_ID
    assert v3["metadata"]["name"] == v4["metadata"]["name"] == "tgi-llmops-demo"
    assert v3["spec"]["selector"] == v4["spec"]["selector"]
    assert v3["spec"]["template"]["metadata"] != v4["spec"]["template"]["metadata"]  # so the pods roll
    selector = v3["spec"]["selector"]["matchLabels"]
    assert selector.items() <= v3["spec"]["template"]["metadata"]["labels"].items()
    assert manifests.ANN_VERSION not in selector


def test_service_targets_the_pods():
    cfg = DeploySection(port=8000)
    svc, dep = manifests.render_service(cfg, name="llmops-demo"), deployment(cfg)
    assert svc["metadata"]["name"] == dep["metadata"]["name"]
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert tgi(dep)["ports"][0]["name"] == "http"


@pytest.mark.parametrize("model_name", ["llmops-demo", "My Model/v2", "x" * 80, "Llama_3.1 8B"])
def test_object_name_is_a_dns_label(model_name):
    name = manifests.object_name(model_name)
    assert len(name) <= 63 and name.startswith("tgi-") and name[-1].isalnum()
    assert all(c.islower() or c.isdigit() or c == "-" for c in name)
    label = manifests.label_value(model_name)
    assert len(label) <= 63 and (not label or (label[0].isalnum() and label[-1].isalnum()))
    validate(manifests.render_service(DeploySection(), name=model_name))


def test_lossy_names_do_not_collide():
    assert manifests.object_name("My Model") != manifests.object_name("my-model")


def test_fetch_model_checks_the_directory_tgi_loads(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(fetch_model.FetchError, match="no \\*.safetensors"):
        fetch_model.check_model_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    fetch_model.check_model_dir(tmp_path)
    assert fetch_model.main(["models:/m/1"]) == 2  # usage


def test_fetch_model_reports_download_failures(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    import mlflow.artifacts

    from serving import verified_model

    def broken(artifact_uri, dst_path):
        raise OSError("connection refused")

    monkeypatch.setattr(
        verified_model,
        "model_version",
        lambda name, version, alias: SimpleNamespace(name=name, version=version, run_id="r", tags={}),
    )
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", broken)
    assert fetch_model.main(["models:/m/1", str(tmp_path / "model")]) == 1
    err = capsys.readouterr().err
    assert "could not download models:/m/1" in err and "connection refused" in err
    assert fetch_model.main(["not-a-model-uri", str(tmp_path / "model")]) == 1


def vllm_cfg(**kw) -> DeploySection:
    return DeploySection(engine="vllm", **kw)


@pytest.mark.parametrize(
    "cfg", [vllm_cfg(), vllm_cfg(accelerator_count=0, node_selector={}, tolerations=[]), vllm_cfg(replicas=2)]
)
def test_vllm_objects_are_schema_valid(cfg):
    for obj in manifests.render(cfg, name="llmops-demo", version="3", run_id=RUN_ID, tags=tags("none")):
        validate(obj)


def test_vllm_container_serves_the_fetched_directory_under_the_registered_name():
    dep = deployment(vllm_cfg(max_total_tokens=4096), quantize="none")
    container, pod = tgi(dep), dep["spec"]["template"]["spec"]
    assert container["name"] == "vllm" and container["image"] == DeploySection().vllm_image
    assert container["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    args = container["args"]
    assert arg(args, "--model") == "/data/model" and arg(args, "--max-model-len") == "4096"
    names = args[args.index("--served-model-name") + 1 : args.index("--served-model-name") + 3]
    assert names == ["llmops-demo", "models:/llmops-demo/3"]
    assert arg(args, "--port") == str(container["ports"][0]["containerPort"])
    assert "--quantization" not in args
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
    # everything the TGI pod has: the same init container, probes, hardening, volumes, rollout strategy
    assert pod["initContainers"][0]["name"] == "fetch-model"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["securityContext"]["runAsNonRoot"] is True
    assert {v["name"] for v in pod["volumes"]} == {"shm", "data", "tmp"}
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert dep["spec"]["template"]["metadata"]["annotations"][manifests.ANN_ENGINE] == "vllm"


def test_a_version_tag_chooses_the_engine_over_the_profile():
    tgi_profile = DeploySection(engines={"other": "vllm"})
    by_tag = manifests.render_deployment(
        tgi_profile, name="llmops-demo", version="3", run_id=RUN_ID, tags={**tags("none"), "deploy.engine": "vllm"}
    )
    assert tgi(by_tag)["name"] == "vllm"
    by_model = manifests.render_deployment(tgi_profile, name="other", version="1", run_id=RUN_ID, tags=tags("none"))
    assert tgi(by_model)["name"] == "vllm"
    assert tgi(deployment(tgi_profile))["name"] == "tgi"
    from serving.engines import EngineRefusal

    with pytest.raises(EngineRefusal, match="deploy.engine='sglang'"):
        manifests.render_deployment(
            tgi_profile, name="m", version="1", run_id=RUN_ID, tags={**tags(), "deploy.engine": "sglang"}
        )


def test_quantization_vllm_cannot_honour_is_refused_with_the_reason():
    from serving.engines import EngineRefusal

    for quantize in ("bitsandbytes", "bitsandbytes-nf4"):
        with pytest.raises(EngineRefusal, match="vLLM 0.32 has no bitsandbytes"):
            deployment(vllm_cfg(), quantize=quantize)
    assert "--quantization" not in tgi(deployment(vllm_cfg(), quantize="none"))["args"]


@pytest.mark.parametrize("engine, flag", [("vllm", "--tensor-parallel-size"), ("tgi", "--num-shard")])
def test_a_pod_with_several_gpus_shards_the_model_over_all_of_them(engine, flag):
    """vLLM would use one GPU of four (its default is no tensor parallelism): the deployer splits the model over
    every GPU the pod requests, unless the profile's own vetted flag chooses the split."""
    four = deployment(DeploySection(engine=engine, accelerator_count=4), quantize="none")
    container = tgi(four)
    assert arg(container["args"], flag) == "4" and container["args"].count(flag) == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    validate(four)
    assert flag not in tgi(deployment(DeploySection(engine=engine, accelerator_count=1), quantize="none"))["args"]
    chosen = DeploySection(engine=engine, accelerator_count=4, extra_args={engine: [f"{flag}=2"]})
    args = tgi(deployment(chosen, quantize="none"))["args"]
    assert args.count(flag) == 1 and arg(args, flag) == "2"


def test_extra_args_pass_only_vetted_flags_with_valid_values():
    from serving.engines import EngineRefusal, vetted_args

    cfg = vllm_cfg(
        extra_args={"vllm": ["--tensor-parallel-size", "2", "--enable-prefix-caching", "--max-model-len=8192"]}
    )
    args = tgi(deployment(cfg, quantize="none"))["args"]
    assert arg(args, "--tensor-parallel-size") == "2" and "--enable-prefix-caching" in args
    assert args.count("--max-model-len") == 1 and arg(args, "--max-model-len") == "8192"  # the profile's wins
    tgi_args = tgi(deployment(DeploySection(extra_args={"tgi": ["--num-shard", "4"]})))["args"]
    assert arg(tgi_args, "--num-shard") == "4"
    assert vetted_args("vllm", ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}'])
    refused = {
        "--trust-remote-code": "not a vetted vllm flag",
        "--chat-template=/tmp/x": "not a vetted vllm flag",
        "--model=/etc": "set by the deployer",
        "--lora-modules": "adapter promotion",
        "--tensor-parallel-size=0": "at least 1",
        "--tensor-parallel-size=+2": "whole number",
        "--trust-remote": "not a vetted vllm flag",  # an abbreviation argparse would expand
        "-tp": "not a vetted vllm flag",
        "--gpu-memory-utilization=1.5": r"\(0, 1\]",
        "--kv-cache-dtype=int3": "one of",
        "--enforce-eager=yes": "takes no value",
    }
    for flag, why in refused.items():
        with pytest.raises(EngineRefusal, match=why):
            vetted_args("vllm", [flag])
    with pytest.raises(EngineRefusal, match="only ngram"):
        vetted_args("vllm", ["--speculative-config", '{"model": "meta-llama/draft", "num_speculative_tokens": 4}'])
    with pytest.raises(ValueError, match="not a vetted tgi flag"):
        DeploySection(extra_args={"tgi": ["--trust-remote-code"]})  # a profile with one never loads


def test_the_init_container_checks_against_the_digest_read_at_deploy_time():
    pinned = {**tags(), "weights.manifest_sha256": "ab" * 32}
    dep = manifests.render_deployment(DeploySection(), name="llmops-demo", version="3", run_id=RUN_ID, tags=pinned)
    command = dep["spec"]["template"]["spec"]["initContainers"][0]["command"]
    assert command[-3:] == ["/data/model", "--manifest-sha256", "ab" * 32]
    assert dep["spec"]["template"]["metadata"]["annotations"][manifests.ANN_MANIFEST] == "ab" * 32
    # the digest is part of the pod template: a changed tag on redeploy rolls the pods
    other = manifests.render_deployment(
        DeploySection(),
        name="llmops-demo",
        version="3",
        run_id=RUN_ID,
        tags={**pinned, "weights.manifest_sha256": "cd" * 32},
    )
    assert other["spec"]["template"] != dep["spec"]["template"]


def placed(*names: str, rank: int = 8):
    from serving.placement import PlacedAdapter

    return tuple(PlacedAdapter(name, "2", f"digest-{name}", rank) for name in names)


@pytest.mark.parametrize("engine", ["tgi", "vllm"])
def test_adapters_placed_on_a_base_are_fetched_pinned_and_loaded_by_either_engine(engine):
    cfg = DeploySection(engine=engine)
    adapters = placed("banking-adapter", "alpaca-adapter")
    objects = manifests.render(cfg, name="base", version="1", run_id=RUN_ID, tags=tags("none"), adapters=adapters)
    for obj in objects:
        validate(obj)
    dep = objects[-1]
    pod = dep["spec"]["template"]["spec"]
    fetch = pod["initContainers"][0]["command"]
    # every adapter fetched into its own directory, checked against the digest pinned when it was placed
    assert "--adapter=alpaca-adapter=models:/alpaca-adapter/2@digest-alpaca-adapter" in fetch
    assert "--adapter=banking-adapter=models:/banking-adapter/2@digest-banking-adapter" in fetch
    args = tgi(dep)["args"]
    if engine == "vllm":
        assert "--enable-lora" in args and arg(args, "--max-loras") == "2" and arg(args, "--max-lora-rank") == "16"
        at = args.index("--lora-modules")
        assert args[at + 1 : at + 3] == [
            "alpaca-adapter=/data/adapters/alpaca-adapter",
            "banking-adapter=/data/adapters/banking-adapter",
        ]
    else:
        assert arg(args, "--lora-adapters") == (
            "alpaca-adapter=/data/adapters/alpaca-adapter,banking-adapter=/data/adapters/banking-adapter"
        )
    # the set is in the pod template: a changed set rolls the pods, and the deployer reads it back
    annotation = dep["spec"]["template"]["metadata"]["annotations"][manifests.ANN_ADAPTERS]
    assert annotation == "alpaca-adapter/2@digest-alpaca-adapter,banking-adapter/2@digest-banking-adapter"
    bare = manifests.render_deployment(cfg, name="base", version="1", run_id=RUN_ID, tags=tags("none"))
    assert manifests.ANN_ADAPTERS not in bare["spec"]["template"]["metadata"]["annotations"]
    assert "--enable-lora" not in tgi(bare)["args"] and "--lora-adapters" not in tgi(bare)["args"]


def test_vllm_max_lora_rank_holds_the_largest_adapter_or_is_refused():
    from serving.engines import EngineRefusal, max_lora_rank

    assert [max_lora_rank(r) for r in ([], [8], [16], [17], [64], [300])] == [16, 16, 16, 32, 64, 320]
    with pytest.raises(EngineRefusal, match="rank 600"):
        max_lora_rank([600])


def test_fetch_model_puts_each_adapter_beside_the_model_checked_against_its_pinned_digest(tmp_path, monkeypatch):
    from components.weights_manifest import VerificationError
    from serving import verified_model

    seen = []

    def download(mv, dest, pinned):
        seen.append((mv, pinned))
        if pinned == "bad":
            raise VerificationError("adapter_model.safetensors differs from the manifest")
        files = dest / "files"
        files.mkdir(parents=True)
        (files / "adapter_config.json").write_text("{}")
        return files

    monkeypatch.setattr(verified_model, "download_verified_adapter", download)
    monkeypatch.setattr(verified_model, "model_version", lambda name, version: (name, version))
    out = fetch_model.fetch_adapter("a=models:/a-adapter/4@good", tmp_path / "adapters")
    assert out == tmp_path / "adapters" / "a" and (out / "adapter_config.json").exists()
    assert seen == [(("a-adapter", "4"), "good")]
    with pytest.raises(fetch_model.FetchError, match="refused adapter models:/a-adapter/4: adapter_model"):
        fetch_model.fetch_adapter("a=models:/a-adapter/4@bad", tmp_path / "adapters")
    with pytest.raises(fetch_model.FetchError, match="expected NAME=models:/name/version@DIGEST"):
        fetch_model.fetch_adapter("a=models:/a-adapter@champion", tmp_path / "adapters")
