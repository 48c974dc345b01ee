"""A registered version's served directory, downloaded and verified before anything serves it.

A version is an MLflow model (the pyfunc in components/chat_pyfunc.py): its MLmodel names where the
merged Hugging Face directory and the weights manifest sit among its artifacts. Every file of that
directory is checked against the manifest, and the manifest against the version's tag
`weights.manifest_sha256`; any difference refuses, naming the file. The TGI init container
(serving/fetch_model.py) and `llmops serve models:/...` both come through here.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from components.chat_pyfunc import artifact_paths
from components.weights_manifest import MANIFEST_TAG, VerificationError, verify


@dataclass(frozen=True)
class Verified:
    path: Path  # the Hugging Face directory TGI loads
    name: str
    version: str
    run_id: str
    bytes_checked: int
    seconds: float


def model_version(name: str, version: str | None = None, alias: str | None = None):
    from mlflow import MlflowClient

    client = MlflowClient()
    return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)


def verify_download(root: Path, mv) -> tuple[Path, int]:
    expected = mv.tags.get(MANIFEST_TAG)
    if not expected:
        raise VerificationError(
            f"version {mv.version} of {mv.name} has no {MANIFEST_TAG} tag: it was not "
            "registered by the register stage, so its files cannot be checked"
        )
    served, manifest = artifact_paths(root)
    return served, verify(served, manifest, expected)


def download_verified(mv, dest: Path) -> Verified:
    """Download version `mv` (once) into dest and verify every served file; raises VerificationError."""
    import mlflow

    started = time.perf_counter()
    dest = Path(dest)
    marker = dest / ".downloaded"
    if not marker.exists():
        shutil.rmtree(dest, ignore_errors=True)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(dest))
        marker.touch()
    served, checked = verify_download(dest, mv)  # every start, cached or not: the cache could be edited too
    return Verified(served, mv.name, mv.version, mv.run_id, checked, time.perf_counter() - started)
