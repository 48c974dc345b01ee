"""Where a deployed version serves: a TGI or vLLM Deployment in Kubernetes (here), or a local `llmops serve`
process, our TGI-protocol server or real vLLM (serving/local_backend.py).

Each backend answers the same questions for the deployer: why a version cannot serve here (`refusal`), what
serves a model now (`actual`), deploy a version, finish a rollout a restarted deployer found half-done, which
models it serves (`managed`), stop serving one (`retire`), and `close` at shutdown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import requests

from serving.engines import Engine, EngineRefusal
from serving.settings import DeploySection

log = logging.getLogger("llmops.deployer")


@dataclass(frozen=True)
class DeployOutcome:
    """What a deploy (or a finished rollout) came to: serving at `endpoint`, or not, for `reason`."""

    ok: bool
    endpoint: str = ""
    reason: str = ""

    @classmethod
    def serving(cls, endpoint: str) -> DeployOutcome:
        return cls(True, endpoint=endpoint)

    @classmethod
    def failed(cls, reason: str) -> DeployOutcome:
        return cls(False, reason=reason)


class ShuttingDown(Exception):
    """The backend closed while a deploy was under way: the deploy was not attempted to its end."""


@dataclass(frozen=True)
class Target:
    name: str
    version: str
    run_id: str
    tags: dict
    adapters: tuple = ()  # serving.placement.PlacedAdapter: the adapters placed on this (base) deployment


class Backend(Protocol):
    """Where versions serve. The deployer decides; a backend only answers and executes."""

    kind: str

    def engine(self, target: Target) -> Engine: ...
    def refusal(self, target: Target) -> str | None: ...
    def actual(self, name: str) -> dict | None: ...
    def deploy(self, target: Target) -> DeployOutcome: ...
    def finish(self, target: Target, actual: dict) -> DeployOutcome: ...
    def endpoint(self, name: str) -> str: ...
    def managed(self) -> set[str]: ...
    def retire(self, name: str, reason: str) -> None: ...
    def close(self) -> None: ...


def _version(target: Target) -> dict:
    """What the rendered objects are made of: the version and the adapters placed on it."""
    return {
        "name": target.name,
        "version": target.version,
        "run_id": target.run_id,
        "tags": target.tags,
        "adapters": target.adapters,
    }


def server_info(url: str, timeout: float = 3.0) -> dict | None:
    try:
        response = requests.get(f"{url}/info", timeout=timeout)
        return response.json() if response.ok else None
    except requests.RequestException:
        return None


class KubeBackend:
    kind = "kubernetes"

    def __init__(self, cfg: DeploySection, api_client=None, poll_s: float = 2.0):
        self.cfg, self.api_client, self.poll_s = cfg, api_client, poll_s

    def engine(self, target: Target) -> Engine:
        return self.cfg.engine_of(target.name, target.tags)

    def refusal(self, target: Target) -> str | None:
        """What the rendered objects cannot honour for this version (its engine, its quantization), or None."""
        from serving.manifests import render

        try:
            render(self.cfg, **_version(target))
        except EngineRefusal as err:
            return f"{err}. Nothing was deployed"
        return None

    def endpoint(self, name: str) -> str:
        from serving.manifests import object_name

        return f"http://{object_name(name)}.{self.cfg.namespace}.svc.cluster.local:{self.cfg.port}"

    def actual(self, name: str) -> dict | None:
        from serving import kube
        from serving.manifests import object_name

        current = kube.current_version(object_name(name), self.cfg.namespace, api_client=self.api_client)
        info = server_info(self.endpoint(name), timeout=1.0) if current else None
        if current and info and info.get("model_sha") and info["model_sha"] != current.get("run_id"):
            return None  # annotations say one thing, the server serves another: redo it
        return current

    def finish(self, target: Target, actual: dict) -> DeployOutcome:
        """The Deployment already names the target (a deployer stopped mid-rollout): wait for it, or roll back."""
        from serving import kube
        from serving.manifests import object_name

        try:
            ok = kube.finish_rollout(
                self.cfg, object_name(target.name), actual["generation"], api_client=self.api_client, poll_s=self.poll_s
            )
        except kube.RolloutError as err:
            return DeployOutcome.failed(str(err))
        return DeployOutcome.serving(self.endpoint(target.name)) if ok else DeployOutcome.failed(self._not_ready())

    def managed(self) -> set[str]:
        from serving import kube

        return set(kube.managed_models(self.cfg.namespace, api_client=self.api_client))

    def retire(self, name: str, reason: str) -> None:
        from serving import kube
        from serving.manifests import object_name

        kube.scale_to_zero(object_name(name), self.cfg.namespace, reason, api_client=self.api_client)

    def _not_ready(self) -> str:
        return (
            f"the rollout did not become ready within {self.cfg.rollout_timeout_s}s and was rolled back "
            "(see the pod's fetch-model init container: it refuses files that fail verification)"
        )

    def close(self) -> None:
        """What this backend deployed keeps serving: the cluster owns it."""

    def deploy(self, target: Target) -> DeployOutcome:
        from serving import kube

        if unpinned := self.cfg.unpinned(engine := self.engine(target)):
            return DeployOutcome.failed(
                f"{' and '.join(unpinned)} still carry the placeholder digest: set the digest your registry serves "
                f"(deploy.{engine}_image=IMAGE:TAG@sha256:...) in the deployer's profile; nothing was applied"
            )
        try:
            ok = kube.deploy_version(self.cfg, **_version(target), api_client=self.api_client, poll_s=self.poll_s)
        except kube.RolloutError as err:
            return DeployOutcome.failed(str(err))
        return DeployOutcome.serving(self.endpoint(target.name)) if ok else DeployOutcome.failed(self._not_ready())
