"""infra/k8s: the kustomize overlays render, are schema-valid for Kubernetes 1.30 (strict), carry no secret
values, and say what the code expects (service names, ports, labels, secret names, CLI arguments).

Rendering is tested twice: always with a small pure-Python renderer that implements exactly the kustomize
subset the overlays use (and rejects anything else), and, when `kubectl` is on PATH, with `kubectl kustomize`,
whose output must equal the Python one. LLMOPS_KUBECTL names a specific kubectl binary (e.g. Debian's 1.20).
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serving import manifests
from serving.settings import DeploySection, load_deployer_config

pytestmark = pytest.mark.unit

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
OVERLAYS = ("local", "production")
NAMESPACE = "llmops"
SERVING_NAMESPACE = "llmops-serving"  # the TGI objects, the deployer's Role, their policies and Secrets

# --------------------------------------------------------------------------------------------------------------
# A pure-Python kustomize for the subset the overlays use: resources (files), bases (directories), namespace,
# images and patchesStrategicMerge. Everything else is refused, so the subset cannot grow unnoticed; the same
# keys are all that kubectl 1.20's embedded kustomize (v2.0.3) supports among the ones we would want.
# --------------------------------------------------------------------------------------------------------------
SUPPORTED_KEYS = {"apiVersion", "kind", "namespace", "resources", "bases", "patchesStrategicMerge", "images"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "CustomResourceDefinition",
    "PriorityClass",
    "IngressClass",
}
# Strategic-merge keys of the lists a patch may touch; any other list is replaced, as the API's SMP does.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}
# Lists whose SMP merge key this renderer does not model: a patch touching them is refused.
UNMODELLED_LISTS = {"ports", "imagePullSecrets", "envFrom", "ephemeralContainers", "hostAliases"}


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def object_id(obj: dict) -> tuple[str, str, str, str]:
    return (obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


def strategic_merge(target, patch, field: str = ""):
    if isinstance(patch, dict) and isinstance(target, dict):
        merged = dict(target)
        for key, value in patch.items():
            if key.startswith("$"):
                raise NotImplementedError(f"patch directive {key} is not supported by the test renderer")
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(patch, list) and isinstance(target, list):
        if field in UNMODELLED_LISTS:
            raise NotImplementedError(f"patching the list {field!r} is not supported by the test renderer")
        key = MERGE_KEYS.get(field)
        if key is None:
            return copy.deepcopy(patch)
        merged = [copy.deepcopy(item) for item in target]
        for item in patch:
            index = next((i for i, old in enumerate(merged) if old.get(key) == item[key]), None)
            if index is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[index] = strategic_merge(merged[index], item, field)
        return merged
    return copy.deepcopy(patch)


def split_image(image: str) -> tuple[str, str | None, str | None]:
    name, _, digest = image.partition("@")
    tag = None
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest or None


def set_images(obj, rules: list[dict]) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    name, tag, digest = split_image(container["image"])
                    rule = next((r for r in rules if r["name"] == name), None)
                    if rule:
                        name = rule.get("newName", name)
                        if "digest" in rule:
                            tag, digest = None, rule["digest"]
                        elif "newTag" in rule:
                            tag, digest = str(rule["newTag"]), None
                        container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
            else:
                set_images(value, rules)
    elif isinstance(obj, list):
        for item in obj:
            set_images(item, rules)


@functools.cache
def _render(directory: Path) -> tuple[dict, ...]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED_KEYS
    assert not unknown, f"{directory}: kustomization uses {sorted(unknown)}, outside the supported subset"
    objects: list[dict] = []
    for entry in kustomization.get("bases", []):
        objects += [copy.deepcopy(o) for o in _render((directory / entry).resolve())]
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        assert path.is_file(), f"{directory}: resources entry {entry!r} is not a file (kustomize v2.0.3 fails)"
        objects += load_docs(path)
    for entry in kustomization.get("patchesStrategicMerge", []):
        for patch in load_docs(directory / entry):
            matches = [
                i
                for i, o in enumerate(objects)
                if o["kind"] == patch["kind"]
                and o["metadata"]["name"] == patch["metadata"]["name"]
                and o["apiVersion"].split("/")[0] == patch["apiVersion"].split("/")[0]
            ]
            assert len(matches) == 1, f"{directory}/{entry}: patch matches {len(matches)} objects"
            objects[matches[0]] = strategic_merge(objects[matches[0]], patch)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    if "images" in kustomization:
        for obj in objects:
            set_images(obj, kustomization["images"])
    ids = [object_id(o) for o in objects]
    assert len(ids) == len(set(ids)), f"{directory}: duplicate objects"
    return tuple(objects)


def render(overlay: str) -> list[dict]:
    return copy.deepcopy(list(_render((K8S / "overlays" / overlay).resolve())))


def by_id(objects: list[dict]) -> dict:
    return {object_id(o): o for o in objects}


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_templates(objects: list[dict]):
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield obj, obj["spec"]["template"]


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.y*ml"))


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_stack(overlay):
    objects = render(overlay)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for expected in [
        ("Namespace", NAMESPACE),
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("StatefulSet", "postgres"),
        ("Service", "postgres"),
        ("StatefulSet", "minio"),
        ("Service", "minio"),
        ("Job", "minio-bucket"),
        ("Deployment", "llmops-deployer"),
        ("Service", "llmops-deployer"),
        ("ServiceAccount", "llmops-deployer"),
        ("Role", "llmops-deployer"),
        ("RoleBinding", "llmops-deployer"),
        ("NetworkPolicy", "default-deny"),
        ("Namespace", SERVING_NAMESPACE),
    ]:
        assert expected in kinds, f"{overlay}: {expected} missing"
    serving = {("Role", "llmops-deployer"), ("RoleBinding", "llmops-deployer"), ("NetworkPolicy", "tgi-ingress")}
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] in (NAMESPACE, SERVING_NAMESPACE), object_id(obj)
        if (obj["kind"], obj["metadata"]["name"]) in serving:
            assert obj["metadata"]["namespace"] == SERVING_NAMESPACE, object_id(obj)
        if obj["kind"] in ("Deployment", "StatefulSet", "Job", "Secret", "ServiceAccount"):
            assert obj["metadata"]["namespace"] == NAMESPACE, object_id(obj)  # no workload beside the TGI pods
    for namespace in (o for o in objects if o["kind"] == "Namespace"):
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_serving_namespace_caps_gpus_and_memory_whatever_the_registry_holds(overlay):
    """No registry write can take more GPUs than the quota: every served pod is Guaranteed, so its GPU and memory
    count against these caps, and two 1-GPU models fit with one rollout in flight."""
    from serving.manifests import render_deployment
    from serving.settings import DeploySection

    quota = find(render(overlay), "ResourceQuota", "serving")
    assert quota["metadata"]["namespace"] == SERVING_NAMESPACE
    hard = quota["spec"]["hard"]
    cfg = DeploySection()
    assert {f"requests.{cfg.accelerator_type}", "requests.memory", "limits.memory", "pods"} <= hard.keys()
    pod = render_deployment(cfg, name="m", version="1", run_id="r", tags={})["spec"]["template"]["spec"]
    gpus = sum(int(c["resources"]["requests"].get(cfg.accelerator_type, 0)) for c in pod["containers"])
    assert gpus * 2 < int(hard[f"requests.{cfg.accelerator_type}"]) <= gpus * 3  # two models, one surge pod
    for container in pod["containers"] + pod["initContainers"]:
        assert container["resources"]["requests"] == container["resources"]["limits"]  # quota counts both alike


def test_kustomizations_stay_within_kustomize_v2_0_3():
    """kubectl 1.20 (Debian's kubernetes-client) embeds kustomize v2.0.3: no `patches`, `labels`, `components`,
    `replacements`; and `resources:` takes files only (directories go in `bases:`)."""
    assert {p.parent.relative_to(K8S).as_posix() for p in kustomizations()} == {
        "base",
        "overlays/local",
        "overlays/production",
    }
    for path in kustomizations():
        kustomization = yaml.safe_load(path.read_text())
        assert set(kustomization) <= SUPPORTED_KEYS, path
        assert "secretGenerator" not in kustomization and "configMapGenerator" not in kustomization
        for entry in kustomization.get("resources", []):
            assert (path.parent / entry).is_file(), f"{path}: {entry} must be a file (v2.0.3)"
        for entry in kustomization.get("bases", []):
            assert (path.parent / entry / "kustomization.yaml").is_file(), f"{path}: {entry}"


def kubectl_binary() -> str | None:
    return os.environ.get("LLMOPS_KUBECTL") or shutil.which("kubectl")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_kustomize_agrees_with_the_test_renderer(overlay):
    kubectl = kubectl_binary()
    if not kubectl:
        pytest.skip(
            "kubectl is not on PATH (apt-get install kubernetes-client, or set LLMOPS_KUBECTL); "
            "rendering is still covered by the pure-Python renderer"
        )
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    ours = render(overlay)
    assert sorted(by_id(rendered)) == sorted(by_id(ours))
    for key, obj in by_id(rendered).items():
        assert obj == by_id(ours)[key], f"{overlay}: kubectl and the test renderer differ on {key}"


# --------------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_schema_valid(overlay):
    for obj in render(overlay):
        try:
            kubernetes_validate.validate(obj, "1.30", strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{overlay}: {obj['kind']}/{obj['metadata']['name']} is invalid: {exc.message} "
                f"at {list(exc.absolute_path)}"
            )


# --------------------------------------------------------------------------------------------------------------
# Secrets: references only
# --------------------------------------------------------------------------------------------------------------
SECRETISH = re.compile(r"PASSWORD|SECRET|KEY|TOKEN|CREDENTIAL", re.IGNORECASE)
URI_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)


def walk(obj, path=()):
    yield path, obj
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from walk(value, path + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from walk(value, path + (i,))


def test_no_manifest_carries_a_secret_value():
    files = manifest_files()
    assert len(files) >= 10
    for path in files:
        text = path.read_text()
        assert not URI_WITH_PASSWORD.search(text), f"{path}: a URI with a password"
        for doc in load_docs(path):
            assert doc.get("kind") != "Secret", f"{path}: Secrets are created by hand, never committed"
            for where, node in walk(doc):
                if isinstance(node, dict):
                    assert "stringData" not in node and "secretGenerator" not in node, path
                if isinstance(node, dict) and "name" in node and len(where) >= 2 and where[-2] == "env":
                    is_path = node["name"].endswith("_FILE") and str(node.get("value", "")).startswith("/")
                    if SECRETISH.search(node["name"]) and not is_path:  # *_FILE: where a mounted Secret is
                        assert "value" not in node and "valueFrom" in node, (
                            f"{path}: env {node['name']} has a literal value; use secretKeyRef"
                        )


def secret_references(objects: list[dict]) -> dict[str, set[str]]:
    """Secret name -> keys referenced (an empty set for a whole-Secret envFrom)."""
    refs: dict[str, set[str]] = {}
    for _, node in walk(objects):
        if isinstance(node, dict) and "secretKeyRef" in node:
            refs.setdefault(node["secretKeyRef"]["name"], set()).add(node["secretKeyRef"]["key"])
        if isinstance(node, dict) and "secretRef" in node:
            refs.setdefault(node["secretRef"]["name"], set())
        if isinstance(node, dict) and "secretName" in node:
            refs.setdefault(node["secretName"], set()).update(i["key"] for i in node.get("items", []))
    return refs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_referenced_secret_and_key_is_created_in_the_readme(overlay):
    readme = (K8S / "README.md").read_text()
    # One command per Secret, continued over lines ending in a backslash.
    created = {
        m.group(1): m.group(0)
        for m in re.finditer(
            r"kubectl -n (?:llmops|llmops-serving) create secret generic ([a-z0-9-]+)((?:[^\n]*\\\n)*[^\n]*)", readme
        )
    }
    refs = secret_references(render(overlay))
    cfg = DeploySection()
    assert "llmops-s3" in refs and "llmops-webhook" in refs
    for name, keys in refs.items():
        assert name in created, f"README does not create Secret {name}"
        for key in keys:
            assert f"--from-literal={key}=" in created[name] or f"--from-file={key}=" in created[name], (
                f"README's command for {name} does not set key {key}"
            )
    # The TGI pods the deployer renders read these, in their own namespace, read-only (serving/manifests.py).
    for name in (cfg.s3_secret, cfg.mlflow_secret):
        assert created[name].startswith(f"kubectl -n {SERVING_NAMESPACE} create secret generic {name}")
    assert "mc admin policy attach llmops-admin readonly --user '<s3-readonly-access-key-id>'" in readme
    # the serving identity and the pipeline read the production models (the model, its base and its adapters),
    # which the admin creates; nobody but a promoter and the deployer writes them
    assert 'for model in ("llmops", "llmops-base", "llmops-adapter"):' in readme
    assert "MlflowClient().create_registered_model(model)" in readme
    grant = '    for who in ({}):\n        users.grant_user_permission(who, "registered_model", model, "{}")'
    assert grant.format('"pipeline", "tgi-reader"', "READ") in readme
    assert grant.format('"deployer", "alice"', "EDIT") in readme


# --------------------------------------------------------------------------------------------------------------
# RBAC and pod hardening
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_is_namespaced_and_narrow(overlay):
    objects = render(overlay)
    kinds = [o["kind"] for o in objects]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    roles = [o for o in objects if o["kind"] == "Role"]
    assert [r["metadata"]["name"] for r in roles] == ["llmops-deployer"]
    assert roles[0]["metadata"]["namespace"] == SERVING_NAMESPACE  # it writes there and nowhere else
    verbs = {
        (g, r): set(rule["verbs"]) for rule in roles[0]["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    # exactly what serving/kube.py calls: no delete, no Secrets, no Pods
    assert verbs == {
        ("apps", "deployments"): {"get", "list", "create", "update", "patch"},
        ("", "services"): {"get", "create", "update"},
        ("policy", "poddisruptionbudgets"): {"get", "create", "update"},
    }
    binding = find(objects, "RoleBinding", "llmops-deployer")
    assert binding["metadata"]["namespace"] == SERVING_NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "llmops-deployer"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llmops-deployer", "namespace": NAMESPACE}]
    for _, template in pod_templates(objects):
        spec = template["spec"]
        if spec.get("serviceAccountName") == "llmops-deployer":
            continue
        assert spec.get("automountServiceAccountToken") is False, "only the deployer talks to the API server"
    deployer = find(objects, "Deployment", "llmops-deployer")["spec"]["template"]["spec"]
    assert deployer["serviceAccountName"] == "llmops-deployer"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_hardened_and_sized(overlay):
    for obj, template in pod_templates(render(overlay)):
        spec, name = template["spec"], obj["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        # Service links inject <SERVICE>_PORT=tcp://...; `mlflow server` would read MLFLOW_PORT as an option.
        assert spec["enableServiceLinks"] is False, name
        mounts_ok = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for container in containers(spec):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
            assert container["resources"]["limits"]["memory"], name
            tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in mounts_ok, f"{name}: /tmp must be a writable emptyDir"
            assert re.fullmatch(r"[^\s@]+@sha256:[0-9a-f]{64}", container["image"]), container["image"]


# --------------------------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------------------------
ALLOWED_HOSTS = ["mlflow", "mlflow.llmops", "mlflow.llmops.svc", "mlflow.llmops.svc.cluster.local", "localhost"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_server_settings(overlay):
    objects = render(overlay)
    spec = find(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["command"] + container["args"]
    assert args[:2] == ["mlflow", "server"]
    assert arg(args, "--host") == "0.0.0.0" and arg(args, "--port") == "5000"
    assert arg(args, "--artifacts-destination") == "s3://llmops-artifacts/mlflow"
    assert "--serve-artifacts" in args
    backend = arg(args, "--backend-store-uri")
    assert backend.startswith("postgresql+psycopg2://postgres.llmops.svc.cluster.local:5432/"), backend
    assert "@" not in backend, "the database password comes from PGPASSWORD, never the URI"
    hosts = arg(args, "--allowed-hosts").split(",")
    for host in ALLOWED_HOSTS:
        assert host in hosts, host
    for host in ALLOWED_HOSTS[:-1]:
        assert f"{host}:5000" in hosts, f"{host}:5000 (clients send the port in the Host header)"
    assert "localhost:*" in hosts  # kubectl port-forward on any local port
    assert "*" not in hosts

    variables = env(container)
    assert variables["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "llmops-mlflow-server",
        "key": "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY",
    }
    assert set(variables["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"]["value"].split(",")) == {"https", "http"}
    assert variables["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"]["value"] == "true"
    assert variables["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio.llmops.svc.cluster.local:9000"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert variables[name]["valueFrom"]["secretKeyRef"] == {"name": "llmops-s3", "key": name}
    for name, key in (("PGUSER", "POSTGRES_USER"), ("PGPASSWORD", "POSTGRES_PASSWORD")):
        assert variables[name]["valueFrom"]["secretKeyRef"] == {"name": "llmops-postgres", "key": key}
    assert int(variables["MLFLOW_WORKERS"]["value"]) >= 1

    # The URI every client is configured with (components/config.py) lands on this Service and port.
    service = find(objects, "Service", "mlflow")
    assert DeploySection().mlflow_tracking_uri == (
        f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:"
        f"{service['spec']['ports'][0]['port']}"
    )
    assert service["spec"]["selector"].items() <= spec_labels(objects, "Deployment", "mlflow").items()
    assert container["ports"][0]["containerPort"] == 5000
    probes = [container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert probes == ["/health"] * 3  # exempt from MLflow's Host check, so kubelet probes are not 403'd


def spec_labels(objects: list[dict], kind: str, name: str) -> dict:
    return find(objects, kind, name)["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_backing_services_take_credentials_from_secrets(overlay):
    objects = render(overlay)
    (postgres,) = find(objects, "StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"]
    pg = env(postgres)
    assert pg["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "llmops-postgres"
    assert pg["POSTGRES_DB"]["value"] == "mlflow"
    assert find(objects, "Service", "postgres")["spec"]["ports"][0]["port"] == 5432
    (minio,) = find(objects, "StatefulSet", "minio")["spec"]["template"]["spec"]["containers"]
    assert env(minio)["MINIO_ROOT_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "llmops-minio"
    assert find(objects, "Service", "minio")["spec"]["ports"][0]["port"] == 9000
    for name in ("postgres", "minio"):
        (claim,) = find(objects, "StatefulSet", name)["spec"]["volumeClaimTemplates"]
        assert claim["spec"]["resources"]["requests"]["storage"]
    (mc,) = find(objects, "Job", "minio-bucket")["spec"]["template"]["spec"]["containers"]
    assert "mc mb --ignore-existing llmops/llmops-artifacts" in mc["command"][-1]


# --------------------------------------------------------------------------------------------------------------
# Deployer
# --------------------------------------------------------------------------------------------------------------
def test_a_cluster_deployer_without_an_allowlist_or_with_a_candidates_model_on_it_refuses_to_start(monkeypatch):
    from typer.testing import CliRunner

    from llmops.cli import app

    monkeypatch.setenv("LLMOPS_WEBHOOK_SECRET", "s")
    done = CliRunner().invoke(app, ["deployer", "--mode", "kubernetes", "deploy.models=[]"])
    assert done.exit_code == 2 and "deploy.models is empty" in done.output
    # nor with a candidates model on it: only the production models a promoter copies into may serve
    done = CliRunner().invoke(app, ["deployer", "--mode", "kubernetes", "deploy.models=[m, m-candidates]"])
    assert done.exit_code == 2 and "deploy.models names candidates models ['m-candidates']" in done.output


def deployer_cli_params(args: list[str]) -> dict:
    """Parse the container's arguments with the real `llmops` CLI, without running it."""
    import typer

    from llmops.cli import app

    command = typer.main.get_command(app).commands[args[0]]
    return command.make_context(args[0], list(args[1:])).params


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployer_runs_the_cli_against_mlflow(overlay):
    objects = render(overlay)
    spec = find(objects, "Deployment", "llmops-deployer")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert split_image(container["image"])[0] == "ghcr.io/llmops/llmops-cpu"
    assert container["command"] == ["llmops"]
    assert container["args"][:11] == [
        "deployer",
        "--mode",
        "kubernetes",
        "--host",
        "0.0.0.0",
        "--port",
        "8700",
        "--public-url",
        "http://llmops-deployer.llmops.svc.cluster.local:8700",
        "--profile",
        "cluster",
    ]
    params = deployer_cli_params(container["args"])
    assert (params["mode"], params["host"], params["port"], params["profile"]) == (
        "kubernetes",
        "0.0.0.0",
        8700,
        "cluster",
    )
    cfg = load_deployer_config(params["profile"], params["overrides"]).deploy  # the overrides are valid config
    assert cfg.models, "a cluster deployer serves an allowlist of registered models"
    assert cfg.namespace == SERVING_NAMESPACE

    variables = env(container)
    assert variables["MLFLOW_TRACKING_URI"]["value"] == cfg.mlflow_tracking_uri
    secret_file = Path(variables["LLMOPS_WEBHOOK_SECRET_FILE"]["value"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in mounts.values() if Path(m["mountPath"]) == secret_file.parent]
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "llmops-webhook"
    assert [i["path"] for i in secret["items"]] == [secret_file.name]
    assert secret["defaultMode"] & 0o040, "fsGroup must be able to read the secret file"
    assert mount.get("readOnly") is True

    state = [m for m in mounts.values() if m["mountPath"] == f"{container['workingDir']}/.llmops"]
    assert state and "emptyDir" in volumes[state[0]["name"]]
    assert all(
        container[p]["httpGet"] == {"path": "/health", "port": "http"}
        for p in ("startupProbe", "readinessProbe", "livenessProbe")
    )
    assert container["ports"] == [{"name": "http", "containerPort": 8700, "protocol": "TCP"}]

    service = find(objects, "Service", "llmops-deployer")
    assert service["spec"]["ports"][0]["port"] == 8700
    public = params["public_url"]
    assert public == f"http://{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:8700"
    assert service["spec"]["selector"].items() <= spec_labels(objects, "Deployment", "llmops-deployer").items()
    assert find(objects, "Deployment", "llmops-deployer")["spec"]["strategy"] == {"type": "Recreate"}


def test_local_overlay_renders_tgi_without_gpu_and_production_with():
    def tgi_pod(overlay: str) -> dict:
        (container,) = find(render(overlay), "Deployment", "llmops-deployer")["spec"]["template"]["spec"]["containers"]
        params = deployer_cli_params(container["args"])
        cfg = load_deployer_config(params["profile"], params["overrides"]).deploy
        return manifests.render_deployment(cfg, name="llmops", version="1", run_id="r", tags={})["spec"]["template"][
            "spec"
        ]

    local, production = tgi_pod("local"), tgi_pod("production")
    assert "tolerations" not in local and "nodeSelector" not in local
    assert set(local["containers"][0]["resources"]["limits"]) == {"cpu", "memory"}  # no GPU asked
    assert production["tolerations"] and production["nodeSelector"]
    assert production["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_production_is_bigger_than_local():
    def memory(value: str) -> float:
        units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
        return float(value[:-2]) * units[value[-2:]]

    local, production = by_id(render("local")), by_id(render("production"))
    for key, obj in production.items():
        if obj["kind"] == "StatefulSet":
            for a, b in zip(local[key]["spec"]["volumeClaimTemplates"], obj["spec"]["volumeClaimTemplates"]):
                assert memory(b["spec"]["resources"]["requests"]["storage"]) > memory(
                    a["spec"]["resources"]["requests"]["storage"]
                ), key
        if obj["kind"] in ("Deployment", "StatefulSet"):
            for a, b in zip(
                local[key]["spec"]["template"]["spec"]["containers"], obj["spec"]["template"]["spec"]["containers"]
            ):
                assert memory(b["resources"]["limits"]["memory"]) > memory(a["resources"]["limits"]["memory"]), key
    assert find(list(production.values()), "Deployment", "mlflow")["spec"]["replicas"] >= 2


# --------------------------------------------------------------------------------------------------------------
# Network policies
# --------------------------------------------------------------------------------------------------------------
TGI = {"app.kubernetes.io/name": manifests.selector_labels("any")["app.kubernetes.io/name"]}
PIPELINE = {"llmops.io/role": "pipeline"}
PIPELINE_NAMESPACE = {"llmops.io/pipelines": "true"}


def peer(pods: dict | None, namespaces: dict | None = None) -> tuple:
    return (
        tuple(sorted((namespaces or {}).items())) if namespaces is not None else None,
        tuple(sorted(pods.items())) if pods is not None else None,
    )


def named(value: str) -> dict:
    return {"app.kubernetes.io/name": value}


PIPELINE_PEERS = {peer(PIPELINE), peer(PIPELINE, PIPELINE_NAMESPACE)}
IN_SERVING = {"kubernetes.io/metadata.name": SERVING_NAMESPACE}
IN_INFRA = {"kubernetes.io/metadata.name": NAMESPACE}
SERVING_CLIENTS = {"llmops.io/serving-clients": "true"}
EXPECTED_INGRESS = {
    # policy: (namespace, pods it selects, allowed peers, port)
    "mlflow-ingress": (
        NAMESPACE,
        named("mlflow"),
        {peer(named("llmops-deployer")), peer(TGI, IN_SERVING)} | PIPELINE_PEERS,
        5000,
    ),
    "postgres-ingress": (NAMESPACE, named("postgres"), {peer(named("mlflow"))}, 5432),
    "minio-ingress": (
        NAMESPACE,
        named("minio"),
        {peer(named("mlflow")), peer(TGI, IN_SERVING), peer(named("minio-bucket"))} | PIPELINE_PEERS,
        9000,
    ),
    "deployer-ingress": (NAMESPACE, named("llmops-deployer"), {peer(named("mlflow"))}, 8700),
    "tgi-ingress": (
        SERVING_NAMESPACE,
        TGI,
        {peer(named("llmops-deployer"), IN_INFRA), peer(None, SERVING_CLIENTS)},
        manifests.CONTAINER_PORT,
    ),
}
EXPECTED_EGRESS = {
    # policy: (namespace, pods it selects, {(peer, port)}); DNS is open to every pod, nothing else
    "mlflow-egress": (  # the only way out for a webhook: the deployer's port (the SSRF check's stand-in)
        NAMESPACE,
        named("mlflow"),
        {(peer(named("postgres")), 5432), (peer(named("minio")), 9000), (peer(named("llmops-deployer")), 8700)},
    ),
    "minio-bucket-egress": (NAMESPACE, named("minio-bucket"), {(peer(named("minio")), 9000)}),
    "deployer-egress": (
        NAMESPACE,
        named("llmops-deployer"),
        {(peer(named("mlflow")), 5000), (peer(TGI, IN_SERVING), 8080), ("0.0.0.0/0", 443), ("0.0.0.0/0", 6443)},
    ),
    "pipeline-egress": (  # task pods run here: the registry, the artifacts, and HTTPS for the Hub
        NAMESPACE,
        PIPELINE,
        {(peer(named("mlflow")), 5000), (peer(named("minio")), 9000), ("0.0.0.0/0", 443)},
    ),
    "tgi-egress": (
        SERVING_NAMESPACE,
        TGI,
        {(peer(named("mlflow"), IN_INFRA), 5000), (peer(named("minio"), IN_INFRA), 9000)},
    ),
}


def peers_of(entries: list[dict]) -> set:
    return {
        p["ipBlock"]["cidr"]
        if "ipBlock" in p
        else peer(
            p["podSelector"].get("matchLabels", {}) if "podSelector" in p else None,
            p["namespaceSelector"].get("matchLabels", {}) if "namespaceSelector" in p else None,
        )
        for p in entries
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_both_ways_by_default_and_name_their_peers(overlay):
    objects = render(overlay)
    policies = {
        (o["metadata"]["namespace"], o["metadata"]["name"]): o["spec"] for o in objects if o["kind"] == "NetworkPolicy"
    }
    for namespace in (NAMESPACE, SERVING_NAMESPACE):
        assert policies.pop((namespace, "default-deny")) == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
        dns = policies.pop((namespace, "allow-dns"))
        assert dns["podSelector"] == {} and dns["policyTypes"] == ["Egress"]
        assert {p["port"] for p in dns["egress"][0]["ports"]} == {53}
    expected = {(ns, name) for name, (ns, *_) in {**EXPECTED_INGRESS, **EXPECTED_EGRESS}.items()}
    assert set(policies) == expected
    workloads = {tuple(sorted(t["metadata"]["labels"].items())): o for o, t in pod_templates(objects)}
    for policy, (namespace, selects, peers, port) in EXPECTED_INGRESS.items():
        spec = policies[(namespace, policy)]
        assert spec["podSelector"] == {"matchLabels": selects} and spec["policyTypes"] == ["Ingress"], policy
        (rule,) = spec["ingress"]
        assert peers_of(rule["from"]) == peers, policy
        assert rule["ports"] == [{"protocol": "TCP", "port": port}], policy
        if selects != TGI:  # the target exists here and listens on that port
            (target,) = [o for labels, o in workloads.items() if selects.items() <= dict(labels).items()]
            ports = [p["containerPort"] for c in target["spec"]["template"]["spec"]["containers"] for p in c["ports"]]
            assert port in ports, policy
    for policy, (namespace, selects, allowed) in EXPECTED_EGRESS.items():
        spec = policies[(namespace, policy)]
        assert spec["podSelector"] == {"matchLabels": selects} and spec["policyTypes"] == ["Egress"], policy
        found = {(p, port["port"]) for rule in spec["egress"] for p in peers_of(rule["to"]) for port in rule["ports"]}
        assert found == allowed, policy


def test_tgi_pods_carry_the_label_the_policies_select():
    deployment = manifests.render_deployment(DeploySection(), name="llmops", version="1", run_id="r", tags={})
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert TGI.items() <= pod_labels.items()
    assert (
        deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
        == EXPECTED_INGRESS["tgi-ingress"][3]
    )
    assert DeploySection().namespace == SERVING_NAMESPACE


def test_every_image_is_pinned_by_digest_and_the_placeholders_are_refused():
    """Infra images get their digests in one place (base/kustomization.yaml); the deployer's two images in its
    profile. The all-zero placeholders name no image anywhere, and the deployer will not roll them out."""
    from serving.settings import PLACEHOLDER

    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert all(rule["digest"] == PLACEHOLDER.removeprefix("@") for rule in base["images"])
    for overlay in OVERLAYS:
        for _, template in pod_templates(render(overlay)):
            for container in containers(template["spec"]):
                assert container["image"].endswith(PLACEHOLDER), container["image"]
    cfg = load_deployer_config("cluster").deploy
    assert cfg.unpinned("tgi") == ["deploy.tgi_image", "deploy.fetch_image"]
    assert cfg.unpinned("vllm") == ["deploy.vllm_image", "deploy.fetch_image"]
    pinned = DeploySection(tgi_image="tgi@sha256:" + "a" * 64, fetch_image="ours@sha256:" + "b" * 64)
    assert pinned.unpinned("tgi") == [] and pinned.unpinned("vllm") == ["deploy.vllm_image"]
    with pytest.raises(ValueError, match="fetch_image"):
        DeploySection(fetch_image="ghcr.io/llmops/llmops-cpu:0.1.0")  # a tag alone is refused at load
