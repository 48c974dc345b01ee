"""Turn what a user passes to `llmops serve` into local directories: a model directory or a registry
reference (`models:/name/version` or `models:/name@alias`), and adapter references likewise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from components.artifacts import TrainedAdapter

REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))$")


@dataclass(frozen=True)
class LocalModel:
    path: Path
    model_id: str
    model_sha: str | None  # the version's run id: one pipeline run registers exactly one version
    name: str | None = None
    version: str | None = None


def _version(name: str, version: str | None, alias: str | None):
    from mlflow import MlflowClient

    client = MlflowClient()
    return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)


def cache_dir() -> Path:
    from serving.client import records_dir

    return records_dir() / "models"


def local_model(ref: str, artifact: str | None = None) -> LocalModel:
    """A local directory as is; a registry reference downloaded once per version into the serving cache.

    artifact=None fetches the version's served directory, verified file by file against the manifest
    recorded at registration (serving.verified_model); artifact="adapter" fetches the LoRA adapter
    logged as its own model in the same run.
    """
    match = REF.match(ref)
    if not match:
        path = Path(ref).expanduser()
        if not (path / "config.json").exists() and not (path / TrainedAdapter.config_file).exists():
            raise FileNotFoundError(
                f"{ref}: neither a model directory nor a models:/name/version or models:/name@alias reference"
            )
        return LocalModel(path.resolve(), str(path), None)
    from serving.verified_model import download_verified, model_version

    mv = model_version(match["name"], match["version"], match["alias"])
    if artifact == "adapter":
        return LocalModel(_adapter(mv), f"models:/{mv.name}/{mv.version}", mv.run_id, mv.name, mv.version)
    verified = download_verified(mv, cache_dir() / mv.name / mv.version / "model")
    return LocalModel(verified.path, f"models:/{mv.name}/{mv.version}", mv.run_id, mv.name, mv.version)


def _adapter(mv) -> Path:
    """The version's LoRA adapter (an adapter model's version, or the adapter a merged version's run logged),
    downloaded once into the serving cache and checked file by file every time it is resolved."""
    from serving.verified_model import download_verified_adapter

    return download_verified_adapter(mv, cache_dir() / mv.name / mv.version / "adapter")


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """`id=REF` pairs; each REF is a PEFT adapter directory or a registry reference whose run logged one."""
    adapters = {}
    for spec in specs:
        adapter_id, sep, ref = spec.partition("=")
        if not sep or not adapter_id or not ref:
            raise ValueError(f"--adapter {spec!r} must be ID=PATH or ID=models:/name@alias")
        adapters[adapter_id] = str(local_model(ref, artifact="adapter" if ref.startswith("models:/") else None).path)
    return adapters
