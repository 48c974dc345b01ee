"""A registered version, downloaded and verified before anything serves or loads it.

A version is an MLflow model (the pyfunc in components/chat_pyfunc.py, logged from code). Every file
of it, MLmodel and the code file MLflow runs included, is checked against the manifest at its root, and
the manifest against the version's tag `weights.manifest_sha256`; any difference refuses, naming the
file. Only then is MLmodel read for where the merged Hugging Face directory sits. The TGI init container
(serving/fetch_model.py) and `llmops serve models:/...` both come through here.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from components.chat_pyfunc import download_version, verify_version

MODEL_SUBDIR = "mlflow_model"  # the version's files, as the store holds them; the download marker stays outside


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


def verify_download(root: Path, mv, pinned: str | None = None) -> tuple[Path, int]:
    """(served directory, bytes checked) of version `mv` downloaded into root; raises VerificationError."""
    return verify_version(root, mv, pinned)


def download_verified(mv, dest: Path, pinned: str | None = None) -> Verified:
    """Download version `mv` (once) into dest and verify every file of it, against the manifest digest the deploy
    pinned when given; raises VerificationError."""
    started = time.perf_counter()
    dest = Path(dest)
    root, marker = dest / MODEL_SUBDIR, dest / ".complete"
    if not marker.exists():
        shutil.rmtree(dest, ignore_errors=True)
        root.mkdir(parents=True)
        download_version(mv, root)
        marker.touch()
    served, checked = verify_download(root, mv, pinned)  # every start, cached or not: the cache could be edited too
    return Verified(served, mv.name, mv.version, mv.run_id, checked, time.perf_counter() - started)
