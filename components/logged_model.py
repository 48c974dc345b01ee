"""The registration run's MLflow 3 LoggedModels: the served chat model, the LoRA adapter, their data.

The served model is the pyfunc of components/chat_pyfunc.py around the merged directory (one copy of
the weights, at `artifacts/model/`), logged from code (no pickle), with the sha256 manifest of every
file of the model at its root, a signature and an input example, the training configuration as model
params, and the evaluation metrics linked to it and to the eval dataset. The adapter is a LoggedModel
of its own, tagged with the base model's hash, so later work can serve registered adapters on a shared
base.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from components import chat_pyfunc, weights_manifest
from components.artifacts import MANIFEST_FILE, PreparedData
from components.progress import megabytes
from components.util import console

DATASET_COLUMNS = ("id", "answer", "prompt", "completion")


def requirements() -> list[str]:
    """Pinned to what logged the model; the llmops package itself comes with the component images."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "torch", "transformers", "accelerate", "safetensors")]


def log_datasets(data_dir: Path):
    """The train and eval splits as MLflow dataset inputs (digests computed by MLflow); returns (train, eval)."""
    import mlflow
    import pandas as pd

    data = PreparedData(data_dir)
    stats = data.stats()
    found = []
    for split, context in (("train", "training"), ("eval", "eval")):
        rows = [{k: r[k] for k in DATASET_COLUMNS} for r in data.examples(split)]
        dataset = mlflow.data.from_pandas(pd.DataFrame(rows), source=stats.source, name=split, targets="answer")
        # Logged with its context before any metric names it: a metric's dataset would log it without one.
        mlflow.log_input(dataset, context=context)
        found.append(dataset)
    return tuple(found)


class _PyfuncWithManifest:
    """The flavor Model.log saves with: MLflow's own pyfunc, then the manifest of every file it wrote.

    Model.log saves the model into a scratch directory and uploads that directory in one go after
    save_model returns, so the manifest written there covers the very bytes the store receives,
    MLmodel included (MLflow writes MLmodel itself, so no manifest taken before logging could cover it).
    """

    def __init__(self):
        self.manifest_sha256 = ""

    def save_model(self, path, **kwargs):
        import mlflow

        mlflow.pyfunc.save_model(path=path, **kwargs)
        for cache in Path(path).rglob("__pycache__"):  # Model.log deletes these before the upload too
            shutil.rmtree(cache)
        self.manifest_sha256 = weights_manifest.write(path, Path(path) / MANIFEST_FILE)


def log_chat_model(model_dir: Path, params: dict[str, str], name: str = "model"):
    """Log the served model from code; returns (ModelInfo, sha256 of its manifest)."""
    from mlflow.models import Model

    started = time.perf_counter()
    flavor = _PyfuncWithManifest()
    # After save_model, MLflow loads the saved model once to check the input example; that import of the
    # copied code file must not leave a __pycache__ beside it, which would be uploaded outside the manifest.
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        info = Model.log(
            artifact_path=None,
            name=name,
            flavor=flavor,
            flavor_name="pyfunc.ModelFromCode",  # what mlflow.pyfunc.log_model records for a code file
            python_model=str(chat_pyfunc.CODE_FILE),  # models-from-code: MLflow copies the file, pickles nothing
            model_type="chat",
            artifacts={chat_pyfunc.MODEL_KEY: str(model_dir)},
            signature=chat_pyfunc.signature(),
            input_example=(chat_pyfunc.INPUT_EXAMPLE, {"max_tokens": 8}),
            pip_requirements=requirements(),
            params=params,
        )
    finally:
        sys.dont_write_bytecode = writes_bytecode
    if info.env_vars:  # Model.log rewrites MLmodel after save_model when it records environment variables
        raise RuntimeError(f"MLflow rewrote MLmodel after its manifest was taken (env_vars {info.env_vars})")
    files = [p for p in Path(model_dir).rglob("*") if p.is_file()]
    size = megabytes(sum(p.stat().st_size for p in files))
    elapsed = time.perf_counter() - started
    console.print(f"uploaded the {name} model to MLflow: {len(files)} files ({size}) in {elapsed:.1f} s")
    return info, flavor.manifest_sha256


def log_adapter_model(adapter_dir: Path, run_id: str, experiment_id: str, base_sha256: str) -> tuple[str, str]:
    """The LoRA adapter as a LoggedModel of the same run, its manifest beside its files (as the served model's
    is), so whatever serves it checks every file first; returns (its model id, the manifest's sha256)."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    client = MlflowClient()
    model = client.create_logged_model(
        experiment_id,
        name="adapter",
        source_run_id=run_id,
        model_type="peft-lora",
        tags={"base_model_sha256": base_sha256},
    )
    with tempfile.TemporaryDirectory() as scratch:
        manifest = Path(scratch) / MANIFEST_FILE
        manifest_sha = weights_manifest.write(adapter_dir, manifest)
        client.log_model_artifacts(model.model_id, str(adapter_dir))
        client.log_model_artifact(model.model_id, str(manifest))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id, manifest_sha


def is_logged_model_whole(client, model_id: str) -> bool:
    """The model's MLmodel, manifest and artifacts exist (an upload cut short leaves one of them out)."""
    names = {a.path for a in client.list_logged_model_artifacts(model_id)}
    return {"MLmodel", MANIFEST_FILE, "artifacts"} <= names
