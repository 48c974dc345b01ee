"""Kubernetes objects (plain dicts) that serve one registered model version with TGI or vLLM.

Pure functions: no cluster access, so they are validated offline against the Kubernetes schemas.
The Deployment's name and selector depend only on the registered model name, so a new version is a
rolling update of the same Deployment; the version lives in labels/annotations of the pod template,
which is what makes a version change roll the pods.
"""

from __future__ import annotations

import hashlib
import math
import re

from components.environment import TRACKING_URI
from components.registry_tags import MANIFEST_TAG, QUANTIZE_TAG
from serving.engines import ENGINE_ENV, Engine, max_lora_rank, tgi_args, vllm_args
from serving.settings import DeploySection

ANN_PREFIX = "llmops.io/"
ANN_NAME = ANN_PREFIX + "model-name"
ANN_VERSION = ANN_PREFIX + "model-version"
ANN_RUN = ANN_PREFIX + "run-id"
ANN_QUANTIZE = ANN_PREFIX + "quantize"
ANN_ENGINE = ANN_PREFIX + "engine"
ANN_MANIFEST = ANN_PREFIX + "manifest-sha256"  # the manifest digest pinned at deploy time
ANN_ADAPTERS = ANN_PREFIX + "adapters"  # the adapters placed on it, name/version@digest, comma-separated

CONTAINER_PORT = 8080  # unprivileged, so the port does not depend on TGI running as root
DATA_DIR = "/data"
MODEL_DIR = DATA_DIR + "/model"
ADAPTER_ROOT = DATA_DIR + "/adapters"  # one directory per placed adapter, named as its registered model


def adapter_dirs(adapters: tuple) -> dict[str, str]:
    return {adapter.name: f"{ADAPTER_ROOT}/{adapter.name}" for adapter in adapters}


GRACE_PERIOD_S = 120  # in-flight generations finish after SIGTERM; long completions take a while
PRESTOP_SLEEP_S = 10  # lets endpoints drop the pod before TGI stops accepting connections
STARTUP_PERIOD_S = 10
FETCH_USER = 1000  # the llmops images' user (infra/images)


def object_name(model_name: str) -> str:
    """`tgi-<model name>` as a DNS-1035 label (valid for both Deployment and Service).

    A lossy rewrite gets a short hash of the original, so two names that differ only in
    characters Kubernetes rejects ("My Model" vs "my-model") cannot share a Deployment.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-")
    name = f"tgi-{slug}".rstrip("-")
    if slug != model_name or len(name) > 63:
        digest = hashlib.sha256(model_name.encode()).hexdigest()[:8]
        name = f"{name[: 63 - 9].rstrip('-')}-{digest}"
    return name


def label_value(value: str) -> str:
    """A value Kubernetes accepts as a label (<=63 chars of [A-Za-z0-9._-], alphanumeric at both ends).

    Labels are for selecting; the exact values are kept in annotations.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", str(value))[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)


def selector_labels(model_name: str) -> dict[str, str]:
    # Immutable on a Deployment: nothing version-specific may go in here.
    return {"app.kubernetes.io/name": "tgi", "app.kubernetes.io/instance": object_name(model_name)}


def common_labels(model_name: str) -> dict[str, str]:
    return {
        **selector_labels(model_name),
        "app.kubernetes.io/component": "inference",
        "app.kubernetes.io/managed-by": "llmops",
        ANN_NAME: label_value(model_name),
    }


def _probe(period_s: int, timeout_s: int, failures: int) -> dict:
    return {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": period_s,
        "timeoutSeconds": timeout_s,
        "failureThreshold": failures,
    }


def locked_down(user: int | None) -> dict:
    """No privilege escalation, no capabilities, the runtime's seccomp profile, and a non-root user when given."""
    context = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if user is not None:
        context.update(runAsNonRoot=True, runAsUser=user, runAsGroup=user)
    return context


def sized(cpu: str, memory: str, extra: dict | None = None) -> dict:
    """Requests equal to limits for CPU and memory (and any GPU): every container so, the pod's QoS is Guaranteed."""
    amounts = {"cpu": cpu, "memory": memory, **(extra or {})}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def engine_command(cfg: DeploySection, engine: Engine, name: str, version: str, tags: dict, adapters: tuple) -> dict:
    """The serving container's command and args: TGI's launcher (the image's entrypoint), or vLLM's OpenAI
    server named explicitly (the vllm-openai image's entrypoint has changed between releases)."""
    if engine == "tgi":
        limits = {k: getattr(cfg, k) for k in ("max_input_tokens", "max_total_tokens", "max_batch_prefill_tokens")}
        extra = cfg.extra_args.get("tgi", [])
        dirs = adapter_dirs(adapters)
        return {
            "args": tgi_args(
                model_dir=MODEL_DIR,
                port=CONTAINER_PORT,
                tags=tags,
                limits=limits,
                extra=extra,
                adapters=dirs,
                shards=cfg.accelerator_count,
            )
        }
    args = vllm_args(
        model_dir=MODEL_DIR,
        host="0.0.0.0",
        port=CONTAINER_PORT,
        name=name,
        version=version,
        tags=tags,
        max_total_tokens=cfg.max_total_tokens,
        extra=cfg.extra_args.get("vllm", []),
        shards=cfg.accelerator_count,  # every GPU the pod requests holds a shard
        adapters=adapter_dirs(adapters),
        max_lora_rank=max_lora_rank([adapter.rank for adapter in adapters]),
    )
    return {"command": ["python3", "-m", "vllm.entrypoints.openai.api_server"], "args": args}


POD_HOME = {"HOME": "/tmp"}  # on the /tmp emptyDir: a non-root UID has no home in either image


def engine_container(cfg: DeploySection, name: str, version: str, tags: dict, adapters: tuple = ()) -> dict:
    engine = cfg.engine_of(name, tags)
    gpus = {cfg.accelerator_type: str(cfg.accelerator_count)} if cfg.accelerator_count > 0 else {}
    container = {
        "name": engine,
        "image": getattr(cfg, f"{engine}_image"),
        "imagePullPolicy": "IfNotPresent",
        **engine_command(cfg, engine, name, version, tags, adapters),
        "env": [{"name": key, "value": value} for key, value in {**ENGINE_ENV[engine], **POD_HOME}.items()],
        "ports": [{"name": "http", "containerPort": CONTAINER_PORT, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "data", "mountPath": DATA_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        # The model is already on disk (init container) when probes start; loading it onto the GPU is the
        # slow part, so the startup probe allows as long as the rollout itself may take. Both engines answer
        # /health with 200 once they serve.
        "startupProbe": _probe(STARTUP_PERIOD_S, 5, max(6, math.ceil(cfg.rollout_timeout_s / STARTUP_PERIOD_S))),
        "readinessProbe": _probe(10, 5, 3),
        "livenessProbe": _probe(30, 10, 3),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_S)]}}},
        # Both images default to root, but write only to /data, /tmp and $HOME: emptyDirs, group-writable
        # through the pod's fsGroup. deploy.tgi_user (1000 by default) runs either without root.
        "securityContext": locked_down(cfg.tgi_user),
        "resources": sized(cfg.tgi_cpu, cfg.tgi_memory, gpus),
    }
    return container


def fetch_container(cfg: DeploySection, name: str, version: str, tags: dict, adapters: tuple = ()) -> dict:
    # The manifest digest as the deployer reads it now, at deploy time: every later pod start checks against it.
    pin = ["--manifest-sha256", tags[MANIFEST_TAG]] if tags.get(MANIFEST_TAG) else []
    # each adapter pinned the same way, into its own directory
    pin += [f"--adapter={a.name}={a.uri}@{a.manifest}" for a in sorted(adapters, key=lambda a: a.name)]
    return {
        "name": "fetch-model",
        "image": cfg.fetch_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "serving.fetch_model", f"models:/{name}/{version}", MODEL_DIR, *pin],
        # HOME=/tmp: the fixed non-root uid below may have no home directory in the image.
        "env": [{"name": TRACKING_URI.name, "value": cfg.mlflow_tracking_uri}, {"name": "HOME", "value": "/tmp"}],
        # Only Secret names appear here; the values stay in the cluster.
        "envFrom": [
            {"secretRef": {"name": cfg.s3_secret}},
            {"secretRef": {"name": cfg.mlflow_secret, "optional": True}},
        ],
        "volumeMounts": [{"name": "data", "mountPath": DATA_DIR}],
        # Our own image runs as uid 1000 (infra/images); the pod's fsGroup lets TGI read what it writes.
        "securityContext": locked_down(FETCH_USER),
        "resources": sized(cfg.fetch_cpu, cfg.fetch_memory),
    }


def version_annotations(
    name: str, version: str, run_id: str, tags: dict, engine: Engine, adapters: tuple = ()
) -> dict[str, str]:
    placed = {ANN_ADAPTERS: ",".join(sorted(a.key for a in adapters))} if adapters else {}
    return {
        **placed,
        ANN_NAME: name,
        ANN_VERSION: str(version),
        ANN_RUN: run_id,
        ANN_QUANTIZE: tags.get(QUANTIZE_TAG, "none"),
        ANN_ENGINE: engine,
        ANN_MANIFEST: tags.get(MANIFEST_TAG, ""),
    }


def version_labels(version: str, run_id: str) -> dict[str, str]:
    return {ANN_VERSION: label_value(version), ANN_RUN: label_value(run_id)}


def pod_spec(cfg: DeploySection, name: str, version: str, tags: dict, adapters: tuple = ()) -> dict:
    spec = {
        "securityContext": {
            "fsGroup": cfg.tgi_user or FETCH_USER,  # the emptyDirs' group: both containers read and write them
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": GRACE_PERIOD_S,
        # TGI never talks to the API server; service links would add env vars TGI's launcher might read.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "initContainers": [fetch_container(cfg, name, version, tags, adapters)],
        "containers": [engine_container(cfg, name, version, tags, adapters)],
        "volumes": [
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.shm_size}},
            {"name": "data", "emptyDir": {"sizeLimit": cfg.model_volume_size}},
            {"name": "tmp", "emptyDir": {"sizeLimit": cfg.tmp_size}},
        ],
    }
    if cfg.node_selector:
        spec["nodeSelector"] = dict(cfg.node_selector)
    if cfg.tolerations:
        spec["tolerations"] = [dict(t) for t in cfg.tolerations]
    return spec


def render_deployment(
    cfg: DeploySection, *, name: str, version: str, run_id: str, tags: dict, adapters: tuple = ()
) -> dict:
    version = str(version)
    annotations = version_annotations(name, version, run_id, tags, cfg.engine_of(name, tags), adapters)
    labels = {**common_labels(name), **version_labels(version, run_id)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": object_name(name),
            "namespace": cfg.namespace,
            "labels": labels,
            "annotations": dict(annotations),
        },
        "spec": {
            "replicas": cfg.replicas,
            "revisionHistoryLimit": 3,
            # The controller marks the rollout failed (ProgressDeadlineExceeded) on the same clock we wait on.
            "progressDeadlineSeconds": cfg.rollout_timeout_s,
            "selector": {"matchLabels": selector_labels(name)},
            # maxUnavailable 0: the old pod keeps serving until the new one is ready, or forever if it never is.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": {**selector_labels(name), **version_labels(version, run_id)},
                    "annotations": dict(annotations),
                },
                "spec": pod_spec(cfg, name, version, tags, adapters),
            },
        },
    }


def render_service(cfg: DeploySection, *, name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": object_name(name), "namespace": cfg.namespace, "labels": common_labels(name)},
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [{"name": "http", "port": cfg.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def render_disruption_budget(cfg: DeploySection, *, name: str) -> dict:
    """A node drain takes one TGI pod at a time. Rendered from two replicas on; left in place when the count
    drops back to one, where maxUnavailable 1 blocks nothing."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": object_name(name), "namespace": cfg.namespace, "labels": common_labels(name)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(name)}},
    }


def render(cfg: DeploySection, *, name: str, version: str, run_id: str, tags: dict, adapters: tuple = ()) -> list[dict]:
    """Everything one version (and the adapters placed on it, serving.placement) needs, in apply order."""
    budget = [render_disruption_budget(cfg, name=name)] if cfg.replicas >= 2 else []
    return [
        render_service(cfg, name=name),
        *budget,
        render_deployment(cfg, name=name, version=version, run_id=run_id, tags=tags, adapters=adapters),
    ]
