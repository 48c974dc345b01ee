"""Training across nodes: the train task hands the train stage to Kubeflow Trainer as a TrainJob, and waits.

Run as: `llmops compile --profile cluster train.launcher=trainjob -o finetune.yaml`, then set `train_nodes` in the
run form (Kubeflow Trainer v2 installed, with its `torch-distributed` ClusterTrainingRuntime).

With `train.launcher: trainjob` the pipeline's train task holds no GPU and trains nothing itself. It renders a
TrainJob (trainer.kubeflow.org/v1alpha1) on the torch-distributed runtime: `train.nodes` nodes of
`train.num_processes` processes each, the same image, the same stage code (`python -m pipelines.trainjob_node`),
the same Secrets and the same checkpoint root. Trainer's torch runtime gives torchrun its rendezvous (PET_NNODES,
PET_NODE_RANK, PET_MASTER_ADDR, ...). The task uploads its inputs (the base model and the data) beside the
checkpoints, where every node reads them; node 0 writes the adapter there, and the task copies it into its output
artifact.

The job's name is a digest of its inputs, so a task retried after a preemption finds the job it started and
waits for it, and a job that failed is replaced by one that resumes from the durable checkpoints. Deciding
(`render`, `state_of`) and acting (`Launcher`) are apart, as in the deployer.
"""

from __future__ import annotations

import hashlib
import threading
import time
from enum import StrEnum
from pathlib import Path

from components.config import TrainSection
from components.environment import CHECKPOINT_ROOT, CODE_DIGEST, POD_NAMESPACE
from components.util import console

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Kubeflow Trainer installs for PyTorch
NODE = "node"  # the runtime's replicated job, and its trainer container
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"  # on each node's pod: the JobSet is named after the TrainJob
RANK_LABEL = "batch.kubernetes.io/job-completion-index"  # the node's rank within its Job


class JobState(StrEnum):
    RUNNING = "running"  # created, suspended or running: wait
    COMPLETE = "complete"
    FAILED = "failed"


def job_name(cfg: TrainSection, inputs: str) -> str:
    """One name per config, inputs and code: a retried task finds its own job. Short enough for a label value."""
    digest = hashlib.sha256(f"{cfg.to_json()}\n{inputs}\n{CODE_DIGEST.get()}".encode()).hexdigest()
    return f"llmops-train-{digest[:16]}"


def output_uri(cfg: TrainSection, name: str) -> str:
    """Where the nodes leave the adapter: beside the checkpoints, on the S3 store every node and the task reach."""
    root = cfg.checkpoint_root or CHECKPOINT_ROOT.get() or ""
    if not root.startswith("s3://"):
        raise ValueError(
            f"train.launcher=trainjob needs an s3:// checkpoint root that every node reaches (train.checkpoint_root "
            f"or ${CHECKPOINT_ROOT.name}), not {root or 'a local directory'!r}"
        )
    return f"{root.rstrip('/')}/trainjobs/{name}/adapter"


def render(
    cfg: TrainSection,
    *,
    name: str,
    namespace: str,
    image: str,
    base_uri: str,
    data_uri: str,
    secrets: dict[str, dict[str, str]],
    accelerator_type: str = "nvidia.com/gpu",
    node_selector: dict | None = None,
    tolerations: list | None = None,
) -> dict:
    """The TrainJob for `cfg`. `secrets`: Secret name -> {key: environment variable}, as the task receives them."""
    env = [{"name": CODE_DIGEST.name, "value": CODE_DIGEST.get() or ""}]
    env += [
        {
            "name": variable,
            "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": secret != "llmops-s3"}},
        }
        for secret, keys in secrets.items()
        for key, variable in keys.items()
    ]
    command = ["python", "-m", "pipelines.trainjob_node", cfg.to_json(), base_uri, data_uri, output_uri(cfg, name)]
    trainer = {
        "image": image,
        "command": command,
        "env": env,
        "numNodes": cfg.nodes,
        "numProcPerNode": cfg.per_node,
    }
    if cfg.use_gpu:
        count = str(cfg.per_node)
        trainer["resourcesPerNode"] = {"limits": {accelerator_type: count}, "requests": {accelerator_type: count}}
    pod = {
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}],
        "containers": [{"name": NODE, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
        **({"nodeSelector": node_selector} if node_selector else {}),
        **({"tolerations": tolerations} if tolerations else {}),
    }
    patch = {
        "template": {"spec": {"replicatedJobs": [{"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}]}}
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/managed-by": "llmops"}},
        "spec": {
            "runtimeRef": {"name": RUNTIME, "kind": "ClusterTrainingRuntime", "apiGroup": GROUP},
            "trainer": trainer,
            "runtimePatches": [{"manager": "llmops.io/pipeline", "trainingRuntimeSpec": patch}],
        },
    }


def state_of(job: dict) -> tuple[JobState, str]:
    """The job's state from its conditions, and the reason Trainer gave."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        why = f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
        if condition.get("type") == "Complete":
            return JobState.COMPLETE, why
        if condition.get("type") == "Failed":
            return JobState.FAILED, why
    return JobState.RUNNING, ""


class Launcher:
    """Submits, finds, watches and replaces TrainJobs in one namespace, and follows rank 0's log."""

    def __init__(self, namespace: str | None = None, api_client=None, poll_s: float = 10.0):
        from kubernetes import client, config

        if api_client is None:
            config.load_incluster_config()
        self.namespace = namespace or POD_NAMESPACE.get()
        if not self.namespace:
            raise RuntimeError(f"${POD_NAMESPACE.name} is unset: the pipeline sets it on the train task")
        self.jobs = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.poll_s, self.followed = poll_s, set()

    def read(self, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.jobs.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def submit(self, job: dict) -> None:
        """Create the job; one of the same name that failed is deleted first (its successor resumes from the
        checkpoints); one still running or complete is kept, and waited for."""
        name = job["metadata"]["name"]
        live = self.read(name)
        if live is not None and state_of(live)[0] == JobState.FAILED:
            console.print(f"TrainJob {name} failed before ({state_of(live)[1]}); replacing it, to resume")
            self.jobs.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
            live = None
        if live is None:
            self.jobs.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, job)
            console.print(f"TrainJob {self.namespace}/{name}: {job['spec']['trainer']['numNodes']} nodes submitted")
        else:
            console.print(f"TrainJob {self.namespace}/{name} already runs (a retried task): waiting for it")

    def wait(self, name: str, timeout_s: float | None = None) -> str:
        """Until the job completes (its reason) or fails (RuntimeError with Trainer's reason)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.read(name)
            if job is None:
                raise RuntimeError(f"TrainJob {self.namespace}/{name} was deleted while the task waited for it")
            self.follow(name)
            state, why = state_of(job)
            if state == JobState.COMPLETE:
                return why
            if state == JobState.FAILED:
                raise RuntimeError(f"TrainJob {self.namespace}/{name} failed: {why or 'no reason given'}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"TrainJob {self.namespace}/{name} did not finish within {timeout_s:.0f}s")
            time.sleep(self.poll_s)

    def follow(self, name: str) -> None:
        """Stream the log of rank 0's pod (each new pod once: a restarted node's too) into the task's log."""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOBSET_LABEL}={name},{RANK_LABEL}=0")
        for pod in pods.items:
            if pod.metadata.name not in self.followed:
                self.followed.add(pod.metadata.name)
                threading.Thread(target=self._stream, args=(pod.metadata.name,), daemon=True).start()

    def _stream(self, pod: str) -> None:
        try:
            response = self.core.read_namespaced_pod_log(
                pod, self.namespace, container=NODE, follow=True, _preload_content=False
            )
            for line in response.stream():
                for text in line.decode(errors="replace").splitlines():
                    console.print(f"[{pod}] {text}", markup=False, highlight=False)
        except Exception as err:  # noqa: BLE001 - a log that cannot be followed never fails the training
            console.print(f"[{pod}] log not followed: {err}")


def run(
    cfg: TrainSection, base_dir: Path, data_dir: Path, out_dir: Path, *, inputs: str, image: str,
    launcher: Launcher | None = None, secrets: dict | None = None, node_selector: dict | None = None,
    tolerations: list | None = None, accelerator_type: str = "nvidia.com/gpu",
) -> dict:  # fmt: skip
    """Train on Kubeflow Trainer and put the adapter in `out_dir`; returns the train stage's metrics. `inputs`
    names the task's inputs (their artifact URIs): with the config and the code it names the job."""
    from components import storage
    from components.artifacts import TrainedAdapter

    launcher = launcher or Launcher()
    name = job_name(cfg, inputs)
    where = output_uri(cfg, name).rsplit("/", 1)[0]
    # The nodes cannot reach this pod's disk: its inputs go beside the job's output, each with its manifest.
    base_uri, data_uri = storage_uri(where, "base"), storage_uri(where, "data")
    if launcher.read(name) is None:
        storage.upload_dir(base_dir, base_uri)
        storage.upload_dir(data_dir, data_uri)
    job = render(
        cfg,
        name=name,
        namespace=launcher.namespace,
        image=image,
        base_uri=base_uri,
        data_uri=data_uri,
        secrets=secrets or {},
        node_selector=node_selector,
        tolerations=tolerations,
        accelerator_type=accelerator_type,
    )
    launcher.submit(job)
    console.print(f"TrainJob {name} complete: {launcher.wait(name) or 'no reason given'}")
    storage.download_dir(output_uri(cfg, name), out_dir)
    return TrainedAdapter(out_dir).metrics().model_dump()


def storage_uri(where: str, what: str) -> str:
    return f"{where}/inputs/{what}"
