"""Every environment variable llmops honours or sets, its meaning, and the one module that names it.

Run as: `llmops config --env` prints each variable llmops reads, with its meaning and current value.
No other module spells a variable's name (tests/unit/test_environment.py fails on one): they read it through
a `Variable` here, so a newcomer finds in one place what the environment can change.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Variable:
    name: str
    meaning: str
    default: str | None = None
    secret: bool = False

    def get(self) -> str | None:
        """Its value, the default when unset or empty."""
        return os.environ.get(self.name) or self.default

    def is_set(self) -> bool:
        return bool(os.environ.get(self.name))

    def set(self, value: str) -> None:
        os.environ[self.name] = value

    def set_default(self, value: str) -> None:
        os.environ.setdefault(self.name, value)

    @contextmanager
    def scoped(self, value: str):
        """Set for the block, then as it was: a value that belongs to one run, not to the process."""
        before = os.environ.get(self.name)
        os.environ[self.name] = value
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(self.name, None)
            else:
                os.environ[self.name] = before

    def shown(self) -> str:
        value = os.environ.get(self.name)
        if value and self.secret:
            return "(set)"
        return value if value else f"(unset; {self.default})" if self.default else "(unset)"


# --- read by llmops ---
TRACKING_URI = Variable(
    "MLFLOW_TRACKING_URI",
    "the MLflow server stages, the deployer and clients use; unset: `llmops run` starts one on loopback, and a "
    "stage run alone skips tracking",
)
EXPERIMENT_NAME = Variable(
    "MLFLOW_EXPERIMENT_NAME", "MLflow's own: the experiment of every stage run and registration, over the two below"
)
EXPERIMENT = Variable("LLMOPS_EXPERIMENT", "the experiment `llmops run` hands its tasks (its registry.experiment)")
MLFLOW_PORT = Variable("LLMOPS_MLFLOW_PORT", "the loopback port `llmops run` starts its MLflow server on", "5077")
CACHE = Variable("LLMOPS_CACHE", "where converted base models are cached", str(Path.home() / ".cache" / "llmops"))
CHECKPOINT_ROOT = Variable("LLMOPS_CHECKPOINT_ROOT", "training checkpoints' root when train.checkpoint_root is unset")
CODE_DIGEST = Variable(
    "LLMOPS_CODE_DIGEST", "the training code's digest, set by the pipeline: a checkpoint of other code is not resumed"
)
RUN_STARTED = Variable(
    "LLMOPS_RUN_STARTED",
    "the run's start in Unix seconds, set by `llmops run` for its tasks: train.max_minutes is then the whole run's "
    "budget (components/run_budget.py); unset: it counts from the train stage's start",
)
GIT_COMMIT = Variable("LLMOPS_GIT_COMMIT", "the commit a registered version records; unset: `git rev-parse HEAD`")
SHUTDOWN_TIMEOUT = Variable("LLMOPS_SHUTDOWN_TIMEOUT", "seconds torchrun's workers get after a SIGTERM", "90")
SERVING_DIR = Variable(
    "LLMOPS_SERVING_DIR", "local serving records and the verified model cache", str(Path(".llmops/serving"))
)
ENDPOINT_URL = Variable(
    "LLMOPS_ENDPOINT_URL", "an endpoint `chat_model` and `llmops chat` call instead of the one the deployer recorded"
)
IMAGE_REGISTRY = Variable("LLMOPS_IMAGE_REGISTRY", "the registry the component images are named in", "ghcr.io/llmops")
WEBHOOK_SECRET = Variable("LLMOPS_WEBHOOK_SECRET", "the HMAC secret MLflow signs webhooks with", secret=True)
WEBHOOK_SECRET_FILE = Variable("LLMOPS_WEBHOOK_SECRET_FILE", "a file holding it (a mounted Kubernetes Secret)")
AWS_ENDPOINT = Variable("AWS_ENDPOINT_URL", "the S3 endpoint (MinIO, moto); boto3 reads it too")
MLFLOW_S3_ENDPOINT = Variable("MLFLOW_S3_ENDPOINT_URL", "MLflow's S3 endpoint, used where AWS_ENDPOINT_URL is unset")
POD_NAMESPACE = Variable(
    "LLMOPS_POD_NAMESPACE", "the train task's namespace (the pipeline sets it from the pod): where its TrainJob goes"
)
NODE_RANK = Variable("PET_NODE_RANK", "a TrainJob node's rank, set by Kubeflow Trainer: node 0 uploads the adapter")
IN_CLUSTER = Variable(
    "KUBERNETES_SERVICE_HOST", "set in a pod: `llmops deployer --mode auto` runs the kubernetes backend"
)

READ = (
    TRACKING_URI, EXPERIMENT_NAME, EXPERIMENT, MLFLOW_PORT, CACHE, CHECKPOINT_ROOT, CODE_DIGEST, RUN_STARTED,
    GIT_COMMIT, SHUTDOWN_TIMEOUT, SERVING_DIR, ENDPOINT_URL, IMAGE_REGISTRY, WEBHOOK_SECRET, WEBHOOK_SECRET_FILE,
    AWS_ENDPOINT, MLFLOW_S3_ENDPOINT, POD_NAMESPACE, NODE_RANK, IN_CLUSTER,
)  # fmt: skip

# --- set by llmops for the libraries and processes it runs ---
# MLflow's client retries: a registry restart costs a stage a wait, not a failure (components/tracking.py).
MLFLOW_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "6",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "120",
}
TOKENIZERS_PARALLELISM = "TOKENIZERS_PARALLELISM"
QUIET_RUN = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
# The local MLflow server's webhooks (pipelines/mlflow_local.py): loopback deliveries, a short cache.
WEBHOOK_SCHEMES, WEBHOOK_PRIVATE_IPS = "MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"
WEBHOOK_CACHE_TTL, WEBHOOK_ENCRYPTION_KEY = "MLFLOW_WEBHOOK_CACHE_TTL", "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"
# Serving engines: offline, no usage reports; vLLM's CPU KV cache and thread binding.
ENGINE_ENV = {
    "tgi": {"HF_HUB_OFFLINE": "1", "USAGE_STATS": "off"},
    "vllm": {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"},
}
VLLM_KV_CACHE, VLLM_THREADS_BIND = "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"
# oneDNN's primitive cache: read once, at a process's first oneDNN kernel (components/inference.bounded_int8_kernels).
ONEDNN_CACHE = Variable("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "oneDNN kernels a process keeps cached")
# Kubernetes Secret keys a pipeline task receives as environment (pipelines/platform.py).
HF_TOKEN = "HF_TOKEN"
AWS_KEY_ID, AWS_SECRET_KEY = "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"
MLFLOW_USERNAME, MLFLOW_PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
# Secret name -> {key in the Secret: environment variable}: what a pipeline task, and a TrainJob's nodes, receive.
TASK_SECRETS = {
    "llmops-hf": {HF_TOKEN: HF_TOKEN},
    "llmops-s3": {key: key for key in (AWS_KEY_ID, AWS_SECRET_KEY, AWS_ENDPOINT.name)},
    "llmops-mlflow": {key: key for key in (TRACKING_URI.name, MLFLOW_USERNAME, MLFLOW_PASSWORD)},
}


def experiment(configured: str) -> str:
    """MLflow's MLFLOW_EXPERIMENT_NAME, else the one `llmops run` handed down, else the configured one."""
    return EXPERIMENT_NAME.get() or EXPERIMENT.get() or configured


def table() -> list[tuple[str, str, str]]:
    """(name, current value, meaning) of every variable llmops reads: `llmops config --env`."""
    return [(v.name, v.shown(), v.meaning) for v in READ]
