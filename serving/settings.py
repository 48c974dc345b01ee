"""Serving's settings: how the deployer serves a promoted version (TGI or vLLM on Kubernetes, or locally), and
what `llmops serve` tells our server (ServerSettings).

Loaded from a deployer profile in serving/configs (local, cluster) or any YAML path, then `deploy.key=value`
overrides, as `llmops deployer --profile cluster deploy.accelerator_count=0`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from components.config import Section
from components.environment import VLLM_KV_CACHE
from components.profiles import Profiled, load_settings
from components.registry_tags import ENGINE_TAG, production_of
from serving.engines import Engine, engine_for, vetted_args
from serving.schemas import MAX_CLIENT_BATCH_SIZE

PROFILE_DIR = Path(__file__).resolve().parent / "configs"
PLACEHOLDER = "@sha256:" + "0" * 64  # the default images' digest: no registry serves it


class DeploySection(Section):
    """How a promoted version is served: TGI or vLLM on Kubernetes, or locally (our server or real vLLM)."""

    # the pipeline's placement names them so (the kfp run form's accelerator_*); the old names still work
    RENAMED: ClassVar[dict[str, str]] = {"gpu_count": "accelerator_count", "gpu_resource": "accelerator_type"}

    alias: str = Field("champion", description="the registry alias that deploys")
    engine: Literal["auto", "tgi", "vllm"] = Field(
        "tgi",
        description=f"the serving engine: tgi or vllm (a version's {ENGINE_TAG} tag, then `engines`, override "
        "it); locally, tgi means our TGI-protocol server. auto (the local profile's): real vLLM where `make vllm` "
        "installed it (1.8-2.6x our tokens/s, docs/BENCHMARKS.md), else our server; tgi in a cluster",
    )
    engines: dict[str, Engine] = Field({}, description="registered model name -> engine, over `engine`")
    extra_args: dict[Engine, list[str]] = Field(
        {},
        description="engine -> extra engine flags, e.g. {vllm: [--tensor-parallel-size, '2']}; only vetted flags "
        "(parallelism, batching, context length, ngram speculation) pass, see serving/engines.py",
    )
    models: list[str] = Field(
        [],
        description="production models this deployer serves (an allowlist; never a candidates model); empty: "
        "every production model",
    )
    namespace: str = Field(
        "llmops-serving",
        description="Kubernetes namespace of the TGI Deployments: apart from the one holding the infrastructure "
        "and its Secrets (infra/k8s/base/namespace.yaml)",
    )
    # Pinned by digest: a tag can move under a running Deployment. The defaults' digests are placeholders (all
    # zeros) that the deployer refuses to roll out: set the digests your registry serves.
    tgi_image: str = Field(
        "ghcr.io/huggingface/text-generation-inference:3.3.4@sha256:" + "0" * 64,
        pattern=r"^[^\s@]+@sha256:[0-9a-f]{64}$",
        description="TGI image, pinned by digest",
    )
    vllm_image: str = Field(
        "vllm/vllm-openai:v0.32.0@sha256:" + "0" * 64,
        pattern=r"^[^\s@]+@sha256:[0-9a-f]{64}$",
        description="vLLM's OpenAI-server image, pinned by digest",
    )
    vllm_python: str = Field(
        "",
        description="local backend: the Python of the virtual environment vLLM is installed in (`make vllm`); "
        "empty: .venv-vllm/bin/python in the project checkout",
    )
    vllm_kv_cache_gb: int = Field(1, ge=1, description=f"local vLLM on CPU: GB of KV cache ({VLLM_KV_CACHE})")
    fetch_image: str = Field(
        "ghcr.io/llmops/llmops-cpu:0.1.0@sha256:" + "0" * 64,
        pattern=r"^[^\s@]+@sha256:[0-9a-f]{64}$",
        description="image of the init container that downloads and verifies the weights, pinned by digest",
    )
    max_input_tokens: int = Field(1024, gt=0, description="TGI --max-input-tokens")
    max_total_tokens: int = Field(2048, gt=0, description="TGI --max-total-tokens (prompt plus answer)")
    max_batch_prefill_tokens: int = Field(4096, gt=0, description="TGI --max-batch-prefill-tokens")
    accelerator_type: str = Field("nvidia.com/gpu", description="the GPU resource a serving pod requests")
    accelerator_count: int = Field(
        1, ge=0, description="GPUs per serving pod, the model split over all of them (tensor parallel); 0 serves on CPU"
    )
    node_selector: dict[str, str] = Field(
        {"nvidia.com/gpu.present": "true"}, description="node labels the TGI pods must match"
    )
    tolerations: list[dict[str, str]] = Field(
        [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="tolerations of the TGI pods",
    )
    shm_size: str = Field("1Gi", description="size of the memory-backed /dev/shm")
    model_volume_size: str = Field(
        "50Gi", description="sizeLimit of the emptyDir holding the downloaded weights (an 8B model in 16 bits: 16 GB)"
    )
    tmp_size: str = Field("2Gi", description="sizeLimit of the emptyDir mounted at /tmp (TGI's HOME and scratch)")
    replicas: int = Field(1, ge=1, description="TGI pods per model; two or more also get a PodDisruptionBudget")
    tgi_user: int | None = Field(
        1000,
        ge=1,
        description="UID (and GID) the TGI container runs as: TGI writes only to /data, /tmp and $HOME, all "
        "emptyDirs here, so it needs no root; null keeps the image's own user (root)",
    )
    tgi_cpu: str = Field("4", description="CPU request and limit of a TGI pod (equal: Guaranteed QoS)")
    tgi_memory: str = Field("32Gi", description="memory request and limit of a TGI pod (host RAM while loading)")
    fetch_cpu: str = Field("1", description="CPU request and limit of the fetch-model init container")
    fetch_memory: str = Field("2Gi", description="memory request and limit of the fetch-model init container")
    port: int = Field(80, description="port of the TGI Service")
    rollout_timeout_s: int = Field(900, gt=0, description="seconds a rollout may take before it is rolled back")
    mlflow_tracking_uri: str = Field(
        "http://mlflow.llmops.svc.cluster.local:5000", description="MLflow as the TGI pods' init container reaches it"
    )
    s3_secret: str = Field(
        "llmops-s3-readonly",
        description="Secret (in the serving namespace) with the read-only S3 credentials the init container downloads "
        "with",
    )
    mlflow_secret: str = Field(
        "llmops-mlflow-reader",
        description="Secret (in the serving namespace) with the MLflow login of the init container: READ only",
    )

    def engine_of(self, name: str, tags: dict, auto: Engine = "tgi") -> Engine:
        """The engine that serves version `tags` of model `name`: its tag, then deploy.engines, then deploy.engine
        (`auto` standing for the backend's choice)."""
        return engine_for(tags, auto if self.engine == "auto" else self.engine, self.engines, name)

    def unpinned(self, engine: Engine) -> list[str]:
        """The image settings a rollout on `engine` needs that still carry the placeholder digest."""
        keys = (f"{engine}_image", "fetch_image")
        return [f"deploy.{key}" for key in keys if getattr(self, key).endswith(PLACEHOLDER)]

    @field_validator("models")
    @classmethod
    def _production_only(cls, names: list[str]) -> list[str]:
        if candidates := [n for n in names if production_of(n)]:
            raise ValueError(
                f"deploy.models names candidates models {candidates}: those hold what the pipeline registered and "
                "never serve; list the production models `llmops promote` copies them into "
                f"({[production_of(n) for n in candidates]})"
            )
        return names

    @field_validator("extra_args")
    @classmethod
    def _vetted(cls, value: dict[Engine, list[str]]) -> dict[Engine, list[str]]:
        for engine, args in value.items():
            vetted_args(engine, args)  # an unknown or dangerous flag stops the deployer at start, named
        return value

    @model_validator(mode="after")
    def _token_limits(self) -> DeploySection:
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError("deploy.max_input_tokens must be below deploy.max_total_tokens")
        return self


class DeployerConfig(Profiled):
    deploy: DeploySection = Field(DeploySection(), description="the deployer: backend, TGI image, rollout, webhooks")


def load_deployer_config(profile: str = "local", overrides: list[str] | None = None) -> DeployerConfig:
    """A deployer profile by name (serving/configs/NAME.yaml) or by path, then `deploy.key=value` overrides."""
    return load_settings(DeployerConfig, profile, PROFILE_DIR, overrides)


class ServerSettings(BaseModel):
    """Everything `llmops serve` tells our TGI-protocol server, validated once and handed to `create_app` whole.

    The limits are TGI launcher flags of the same names (`--max-input-tokens`, `--max-total-tokens`,
    `--max-concurrent-requests`, `--max-client-batch-size`, `--payload-limit`); the token limits default from
    the model's context when unset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: str = Field(description="the model directory served")
    model_id: str | None = Field(None, description="the name /info reports (models:/name/version), else the path")
    model_sha: str | None = Field(None, description="the version's run id, reported by /info")
    adapters: dict[str, str] | None = Field(None, description="adapter id -> PEFT adapter directory")
    max_input_tokens: int | None = Field(None, gt=0, description="the longest prompt, in tokens")
    max_total_tokens: int | None = Field(None, gt=1, description="prompt plus generated tokens")
    max_concurrent_requests: int = Field(128, gt=0, description="requests in flight before 429")
    max_batch_size: int = Field(16, gt=0, description="rows decoded together")
    max_client_batch_size: int = Field(MAX_CLIENT_BATCH_SIZE, gt=0, description="prompts in one /v1/completions")
    dtype: str = Field("auto", description="auto, bfloat16, float16 or float32")
    threads: int = Field(1, gt=0, description="torch threads of the scheduler")
    max_body_bytes: int = Field(2_000_000, gt=0, description="TGI's --payload-limit")
