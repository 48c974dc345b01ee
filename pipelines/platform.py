"""Cluster placement for the compiled pipeline (kfp-kubernetes): GPUs, /dev/shm, secrets, retries.

Every GPU stage gets the same treatment: the accelerator from the run form, so a user changes it in the Kubeflow
UI without recompiling, and the node selector and tolerations from the profile, which belong to the cluster.
Every task gets CPU and memory from `placement.resources`. kfp.local ignores all of this, which is why it is
verified on the compiled YAML instead.
"""

from kfp import kubernetes

from components import environment as env

# Secret name -> {key in the Secret: environment variable}. Only names travel in the YAML, never values.
SECRETS = env.TASK_SECRETS
SHM_SIZE = "8Gi"
TRAIN_RETRIES = 3


def with_secrets(task):
    """Credentials as environment from named Secrets, and the label the NetworkPolicies admit to MLflow and MinIO."""
    for name, keys in SECRETS.items():
        kubernetes.use_secret_as_env(task, secret_name=name, secret_key_to_env=keys, optional=name != "llmops-s3")
    return kubernetes.add_pod_label(task, label_key="llmops.io/role", label_value="pipeline")


def on_gpu(task, accelerator_type, accelerator_count, node_selector: dict, tolerations: list):
    """Accelerator, placement and a memory-backed /dev/shm (NCCL and DataLoader workers need more than 64 MiB)."""
    task.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_count)
    kubernetes.add_node_selector_json(task, node_selector_json=node_selector)
    kubernetes.add_toleration_json(task, toleration_json=tolerations)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE)
    return with_secrets(task)


def launches_trainjobs(task):
    """The train task under train.launcher=trainjob: no GPU, its credentials (the TrainJob's nodes get the same
    Secrets by name), and its namespace, where it creates the TrainJob (RBAC: infra/k8s/kubeflow/)."""
    kubernetes.use_field_path_as_env(task, env_name=env.POD_NAMESPACE.name, field_path="metadata.namespace")
    return with_secrets(task)


def sized(task, resources: dict[str, dict[str, str]], name: str):
    """CPU and memory requests equal to their limits (a Guaranteed pod), from placement.resources[name]."""
    if name not in resources:
        raise ValueError(f"placement.resources has no entry for task {name!r} (tasks: {sorted(resources)})")
    cpu, memory = resources[name]["cpu"], resources[name]["memory"]
    return task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)


def retry_training(task):
    """Retries cover crashes and evictions the pod sees; a preempted node needs the checkpoint resume in train."""
    return task.set_retry(num_retries=TRAIN_RETRIES, backoff_duration="60s", backoff_factor=2.0)
