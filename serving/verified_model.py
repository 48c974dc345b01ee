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
from components.registry_tags import ADAPTER_MANIFEST_TAG, ADAPTER_MODEL_TAG, MANIFEST_TAG, ModelKind, kind_of

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


def download_once(dest: Path, fetch, digest: str) -> None:
    """Run `fetch` to fill dest unless an earlier fetch of the same manifest `digest` completed there. A fetch
    cut short is started over, so no stray file of it reaches the manifest check; a copy of another registration
    under the same name and number (a model deleted and registered again, another registry) is fetched anew
    instead of being refused for ever. A cached file edited since is still refused by the check that follows."""
    marker = Path(dest) / ".complete"
    if not marker.exists() or marker.read_text() != digest:
        shutil.rmtree(dest, ignore_errors=True)
        Path(dest).mkdir(parents=True)
        fetch()
        marker.write_text(digest)


def download_verified(mv, dest: Path, pinned: str | None = None) -> Verified:
    """Download version `mv` (once) into dest and verify every file of it, against the manifest digest the deploy
    pinned when given; raises VerificationError."""
    started = time.perf_counter()
    dest = Path(dest)
    root = dest / MODEL_SUBDIR
    download_once(dest, lambda: download_version(mv, root), mv.tags.get(MANIFEST_TAG, ""))
    served, checked = verify_version(root, mv, pinned)  # every start, cached or not: the cache could be edited too
    return Verified(served, mv.name, mv.version, mv.run_id, checked, time.perf_counter() - started)


def adapter_source(mv) -> tuple[str, str]:
    """(LoggedModel id, manifest digest) of the adapter `mv` stands for: an adapter model's version is the adapter
    itself; a merged version names the adapter its run logged."""
    from components.weights_manifest import VerificationError

    if kind_of(mv.tags) == ModelKind.ADAPTER:
        model_id, expected, tag = mv.source.removeprefix("models:/"), mv.tags.get(MANIFEST_TAG), MANIFEST_TAG
    else:
        model_id, expected, tag = (
            mv.tags.get(ADAPTER_MODEL_TAG),
            mv.tags.get(ADAPTER_MANIFEST_TAG),
            ADAPTER_MANIFEST_TAG,
        )
        if not model_id:
            raise FileNotFoundError(
                f"version {mv.version} of {mv.name} has no {ADAPTER_MODEL_TAG} tag: no adapter was logged"
            )
    if not expected:
        raise VerificationError(
            f"version {mv.version} of {mv.name} has no {tag} tag: its adapter was registered before adapters "
            "carried a manifest, so nothing can vouch for its files; register it again"
        )
    return model_id, expected


def download_verified_adapter(mv, dest: Path, pinned: str | None = None) -> Path:
    """The adapter behind `mv`, downloaded once into dest/files and checked file by file against the manifest
    its registration pinned (or the digest a deploy pinned), every time; raises VerificationError."""
    import mlflow

    from components.artifacts import MANIFEST_FILE
    from components.weights_manifest import VerificationError, verify

    model_id, expected = adapter_source(mv)
    expected = pinned or expected
    target = Path(dest) / "files"  # below the download marker: the manifest lists every file in it

    def fetch():
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_id}", dst_path=str(target))

    download_once(Path(dest), fetch, expected)
    try:
        verify(target, target / MANIFEST_FILE, expected)
    except VerificationError as err:
        raise VerificationError(f"the adapter of {mv.name}/{mv.version}: {err}") from None
    return target
